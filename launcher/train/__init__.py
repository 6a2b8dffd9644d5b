"""The train core, run unchanged in every process of every backend (``python -m launcher.train``):
the Trainer with Flotilla's callbacks, verified checkpoints, ZeRO-3 gathering, preflight, metrics
and evaluation; at the end it writes the run's report.html with :mod:`launcher.report`.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.train.checkpoint import save_verified
from launcher.train.core import run_training
from launcher.train.evaluate import evaluate_target
from launcher.train.export import ExportResult, export_run
from launcher.train.tracking import Trackers, open_trackers

__all__ = [
    "ExportResult",
    "Trackers",
    "evaluate_target",
    "export_run",
    "open_trackers",
    "run_training",
    "save_verified",
]
