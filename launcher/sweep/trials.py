"""A sweep on disk: its folder, its trials (each an ordinary run directory), every trial's spec
validated before anything starts, and what a re-run finds already done."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.atomic import write_json_atomic
from launcher.errors import FlotillaError, SpecError
from launcher.plan import PreparedRun, load_job, prepare_run, reopen_run, validate_job, with_backend
from launcher.spec import JobSpec, SweepSpec
from launcher.sweep.space import trial_params

#: The sweep folder's record of what it searches (read by a re-run, status, logs and cancel).
SWEEP_RECORD = "sweep.json"
#: Left in a trial's run directory when the sweep's scheduler stopped it early (ASHA, median).
STOPPED_MARKER = "sweep-stopped.json"
#: Sweep keys that decide which trials exist and how they run (the folder is named after them).
IDENTITY_KEYS = ("grid", "space", "random", "seed", "backend")


@dataclass
class Trial:
    """One point of the search and the run directory that trains it."""

    index: int
    params: dict[str, Any]
    run_dir: Path

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"

    def overrides(self) -> list[str]:
        """The trial's values as ``key.path=value`` overrides (JSON is YAML)."""
        return [f"{key}={json.dumps(value)}" for key, value in self.params.items()]

    def state(self) -> str:
        """``finished``, ``stopped`` (by the scheduler), ``incomplete`` (started) or ``pending``."""
        if (self.run_dir / "summary.json").is_file():
            return "finished"
        if (self.run_dir / STOPPED_MARKER).is_file():
            return "stopped"
        return "incomplete" if (self.run_dir / "plan.json").is_file() else "pending"


@dataclass
class Sweep:
    """The trials of one search over a job spec, and where they live."""

    spec_path: Path
    overrides: list[str]
    settings: SweepSpec
    spec: JobSpec
    directory: Path
    trials: list[Trial]

    @property
    def trial_backend(self) -> str | None:
        """The backend every trial runs on: Ray Train or Slurm for those sweeps, else the spec's own."""
        return self.settings.backend if self.settings.backend != "local" else None

    def trial_overrides(self, trial: Trial) -> list[str]:
        """The overrides that make ``trial``'s spec: the user's, no sweep section, the trial's values."""
        return with_backend([*self.overrides, "sweep=null", *trial.overrides()], self.trial_backend)

    def prepare(self, trial: Trial) -> PreparedRun:
        """The trial's run directory: reopened when it exists (resumed from its last checkpoint),
        else created."""
        if (trial.run_dir / "plan.json").is_file():
            return reopen_run(trial.run_dir)
        return prepare_run(self.spec_path, self.trial_overrides(trial), run_dir=trial.run_dir)

    def todo(self) -> list[Trial]:
        """Trials a run still has to train (not finished, not stopped by the scheduler)."""
        return [t for t in self.trials if t.state() not in ("finished", "stopped")]


def open_sweep(spec_path: Path, overrides: list[str], options: dict[str, Any]) -> Sweep:
    """Validate the job spec, its ``sweep:`` section with ``options`` (the command line's) over it,
    and every trial's spec, before anything starts; the sweep's folder and record."""
    base = load_job(spec_path, overrides)
    merged = {**(base.sweep.model_dump() if base.sweep else {}), **options}
    data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    data["sweep"] = merged
    checked = validate_job(data, f"{spec_path} (with the sweep options)", overrides)
    settings = checked.sweep
    assert settings is not None
    identity = {key: getattr(settings, key) for key in IDENTITY_KEYS}
    digest = hashlib.sha256(
        json.dumps(
            {"spec": spec_path.read_text(encoding="utf-8"), "overrides": overrides, **identity},
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:10]
    directory = Path(base.output.dir) / base.name / f"sweep-{digest}"
    params = trial_params(settings, settings.seed if settings.seed is not None else base.seed)
    trials = [Trial(i, p, directory / "trials" / f"trial-{i:03d}") for i, p in enumerate(params)]
    sweep = Sweep(spec_path.resolve(), overrides, settings, base, directory.resolve(), trials)
    check_trials(sweep)
    return sweep


def check_trials(sweep: Sweep) -> None:
    """Every trial's spec must validate: one error listing each problem once, naming the trials."""
    problems: dict[str, list[str]] = {}
    for trial in sweep.trials:
        try:
            load_job(sweep.spec_path, sweep.trial_overrides(trial))
        except SpecError as exc:
            values = ", ".join(f"{k}={v}" for k, v in trial.params.items())
            for problem in exc.problems:
                problems.setdefault(problem, []).append(f"{trial.name} ({values})")
    if problems:
        raise SpecError(
            f"{sweep.spec_path} (sweep)",
            [f"{problem} [in {', '.join(names)}]" for problem, names in problems.items()],
        )


def write_record(sweep: Sweep) -> None:
    """``sweep.json``: the search, its trials and their run directories."""
    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        sweep.directory / SWEEP_RECORD,
        {
            "spec": str(sweep.spec_path),
            "overrides": sweep.overrides,
            "sweep": sweep.settings.model_dump(),
            "trials": [
                {"trial": t.name, "params": t.params, "run_dir": str(t.run_dir)} for t in sweep.trials
            ],
        },
    )


def is_sweep_dir(path: Path) -> bool:
    """Whether ``path`` is a sweep's folder."""
    return (path / SWEEP_RECORD).is_file()


def reopen_sweep(directory: Path) -> tuple[SweepSpec, list[Trial]]:
    """The settings and trials recorded in a sweep's folder."""
    if not is_sweep_dir(directory):
        raise FlotillaError(f"{directory} is not a sweep folder (no {SWEEP_RECORD})")
    record = json.loads((directory / SWEEP_RECORD).read_text(encoding="utf-8"))
    trials = [Trial(i, t["params"], Path(t["run_dir"])) for i, t in enumerate(record["trials"])]
    return SweepSpec.model_validate(record["sweep"]), trials
