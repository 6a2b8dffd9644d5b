"""Where a sweep's trials run: here one after another, as one Ray Tune search, or as one Slurm job
array. Each runner trains the trials a re-run still has to (finished and stopped ones are skipped)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from launcher.atomic import write_json_atomic
from launcher.backends import find_job, get_backend
from launcher.errors import REQUEUE_EXIT_CODE, FlotillaError
from launcher.rundir import read_jsonl
from launcher.sweep.trials import STOPPED_MARKER, Sweep, Trial

#: The sweep's Slurm job array (``flotilla status/logs/cancel <sweep dir>`` use its tasks).
ARRAY_RECORD = "array.json"
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
POLL_S = 2.0


def describe(trial: Trial) -> str:
    """``trial-001 (train.learning_rate=0.0003, peft.r=8)``."""
    return f"{trial.name} ({', '.join(f'{k}={v}' for k, v in trial.params.items())})"


def run_local(sweep: Sweep, todo: list[Trial], console: Console, wait: bool = True) -> int:
    """One trial after another, each on its own spec's backend, as ``flotilla run`` would (a trial
    that has a run directory resumes from its last verified checkpoint); 85 when one is stopped
    by a signal (run the sweep again to continue), 1 when one failed."""
    failed = []
    for trial in todo:
        console.print(f"[bold]{escape(describe(trial))}[/]: {trial.run_dir}")
        try:
            prepared = sweep.prepare(trial)
            backend = get_backend(prepared.plan.backend)
            code = backend.launch(prepared.plan, console, wait=True).exit_code or 0
        except FlotillaError as exc:
            console.print(f"[red]{trial.name} failed:[/]", escape(str(exc)))
            failed.append(trial.name)
            continue
        if code == REQUEUE_EXIT_CODE:
            console.print(f"{trial.name} stopped with a checkpoint; run the same sweep again to continue it")
            return REQUEUE_EXIT_CODE
        if code:
            console.print(f"[red]{trial.name} ended with exit code {code}[/]")
            failed.append(trial.name)
    return 1 if failed else 0


def run_ray(sweep: Sweep, todo: list[Trial], console: Console, wait: bool = True) -> int:
    """All trials as one Ray Tune search; trials its scheduler stopped are marked as such."""
    plans = [sweep.prepare(trial).plan for trial in todo]
    settings = sweep.settings
    outcomes = getattr(get_backend("ray"), "tune")(  # noqa: B009 (the Backend protocol has no tune)
        plans,
        settings.metric,
        settings.mode,
        settings.scheduler,
        settings.max_concurrent,
        sweep.directory / "tune",
        console,
    )
    failed = 0
    for trial in todo:
        outcome = outcomes.get(str(trial.run_dir), "failed: not run")
        if outcome == "stopped":
            steps = [int(r["step"]) for r in read_jsonl(trial.run_dir / "metrics.jsonl") if "step" in r]
            write_json_atomic(
                trial.run_dir / STOPPED_MARKER,
                {"scheduler": settings.scheduler, "step": max(steps, default=0)},
            )
            console.print(
                f"{trial.name}: stopped early by {settings.scheduler} at step {max(steps, default=0)}"
            )
        elif outcome != "finished":
            failed += 1
    return 1 if failed else 0


def run_slurm(sweep: Sweep, todo: list[Trial], console: Console, wait: bool = True) -> int:
    """All trials as one Slurm job array (``--array=i,j,...%max_concurrent``), each task one trial
    with Flotilla's requeue and resume; with ``wait``, until every task has ended."""
    record = sweep.directory / ARRAY_RECORD
    if record.is_file():
        active = [t.name for t in todo if task_state(t) not in (*FINAL, "UNKNOWN")]
        if active:
            raise FlotillaError(
                f"the sweep's Slurm job array {json.loads(record.read_text())['job_id']} is still running "
                f"({', '.join(active)}): follow it with flotilla status {sweep.directory}, or cancel it"
            )
    plans = {trial.index: sweep.prepare(trial).plan for trial in todo}
    backend = get_backend("slurm")
    array_id = getattr(backend, "launch_array")(  # noqa: B009 (the Backend protocol has no launch_array)
        plans, sweep.spec.name, sweep.directory / "trials", sweep.settings.max_concurrent, console
    )
    write_json_atomic(record, {"backend": "slurm", "job_id": array_id})
    if not wait:
        return 0
    shown: dict[str, str] = {}
    while True:
        states = {trial.name: task_state(trial) for trial in todo}
        for name, state in states.items():
            if shown.get(name) != state:
                console.print(f"{name}: {state}")
        shown = states
        if all(state in FINAL for state in states.values()):
            return 0 if all(state == "SUCCEEDED" for state in states.values()) else 1
        time.sleep(POLL_S)


def task_state(trial: Trial) -> str:
    """A trial's state as its backend reports it (a run without a job record: from its folder)."""
    if not (trial.run_dir / "plan.json").is_file():
        return "PENDING"
    if (trial.run_dir / STOPPED_MARKER).is_file():
        return "CANCELLED"
    backend, job_id, run_dir = find_job(str(trial.run_dir), None)
    return backend.status(job_id, Path(run_dir) if run_dir else None)


RUNNERS = {"local": run_local, "ray": run_ray, "slurm": run_slurm}
