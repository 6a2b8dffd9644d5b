"""Sweeps: a search over a job spec's keys (grid, random) whose every trial is an ordinary run
directory, run here one after another, on Ray Tune (with early stopping) or as a Slurm job array,
and the table of results with the best run.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.sweep.control import sweep_cancel, sweep_logs, sweep_status
from launcher.sweep.run import SweepOutcome, run_sweep
from launcher.sweep.space import parse_grid_options, parse_space_options
from launcher.sweep.trials import is_sweep_dir

__all__ = [
    "SweepOutcome",
    "is_sweep_dir",
    "parse_grid_options",
    "parse_space_options",
    "run_sweep",
    "sweep_cancel",
    "sweep_logs",
    "sweep_status",
]
