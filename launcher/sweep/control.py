"""``flotilla status | logs | cancel <sweep dir>``: every trial's state, output and stop, through the
backend that runs it (a Slurm sweep: its job array's tasks)."""

from __future__ import annotations

from pathlib import Path

from launcher.backends import find_job
from launcher.errors import FlotillaError
from launcher.sweep.runners import FINAL, describe, task_state
from launcher.sweep.trials import reopen_sweep


def sweep_status(directory: Path) -> str:
    """One line for the sweep (how many trials in each state), then one per trial."""
    _, trials = reopen_sweep(directory)
    states = [(trial, task_state(trial)) for trial in trials]
    counts: dict[str, int] = {}
    for _, state in states:
        counts[state] = counts.get(state, 0) + 1
    lines = [f"sweep {directory}: {len(trials)} trials, " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    lines += [f"{state:<10} {describe(trial)} {trial.run_dir}" for trial, state in states]
    return "\n".join(lines)


def sweep_logs(directory: Path, follow: bool = False) -> str:
    """Each started trial's output under a header (``follow``: each trial's in turn, to its end)."""
    _, trials = reopen_sweep(directory)
    parts = []
    for trial in trials:
        if not (trial.run_dir / "plan.json").is_file():
            continue
        backend, job_id, run_dir = find_job(str(trial.run_dir), None)
        header = f"=== {describe(trial)}: {trial.run_dir} ===\n"
        if follow:
            print(header, end="", flush=True)
        parts.append(header + backend.logs(job_id, run_dir, follow=follow))
    return "" if follow else "".join(parts)


def sweep_cancel(directory: Path) -> list[str]:
    """Stop every trial that has not ended (a Slurm sweep: each task of its array); their names."""
    _, trials = reopen_sweep(directory)
    cancelled = []
    for trial in trials:
        if not (trial.run_dir / "job.json").is_file():
            continue
        if task_state(trial) in FINAL:
            continue
        backend, job_id, run_dir = find_job(str(trial.run_dir), None)
        backend.cancel(job_id, run_dir)
        cancelled.append(trial.name)
    if not cancelled and not any((t.run_dir / "job.json").is_file() for t in trials):
        raise FlotillaError(
            f"{directory} runs its trials in the foreground of `flotilla sweep` (local, Ray Tune): "
            "stop it there with Ctrl-C, which saves a checkpoint; the same command continues it"
        )
    return cancelled
