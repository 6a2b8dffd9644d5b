"""``flotilla sweep``: validate every trial, train those not done yet, write the results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from launcher.sweep.results import write_results
from launcher.sweep.runners import RUNNERS
from launcher.sweep.trials import open_sweep, write_record


@dataclass
class SweepOutcome:
    """Where the sweep lives, how its run ended (an exit code) and its results table."""

    directory: Path
    exit_code: int
    results: dict[str, Any]


def run_sweep(
    spec_path: Path, overrides: list[str], options: dict[str, Any], console: Console, wait: bool = True
) -> SweepOutcome:
    """Run the sweep of ``spec_path`` (its ``sweep:`` section, ``options`` over it); a re-run of the
    same sweep skips finished trials and resumes interrupted ones."""
    sweep = open_sweep(spec_path, overrides, options)
    write_record(sweep)
    todo = sweep.todo()
    done = len(sweep.trials) - len(todo)
    console.print(
        f"sweep {sweep.directory}: {len(sweep.trials)} trial(s) on {sweep.settings.backend}"
        + (f", {done} already done (skipped)" if done else "")
    )
    code = RUNNERS[sweep.settings.backend](sweep, todo, console, wait) if todo else 0
    results = write_results(sweep.directory, sweep.trials, sweep.settings)
    return SweepOutcome(sweep.directory, code, results)
