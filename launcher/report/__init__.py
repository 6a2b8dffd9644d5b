"""Reports of finished runs as self-contained HTML pages: one run's report.html, and the
comparison of several runs (spec diff, final metrics, overlaid curves). Standard library only.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.report.compare import write_comparison
from launcher.report.runs import Run, load_run
from launcher.report.single import write_report

__all__ = [
    "Run",
    "load_run",
    "write_comparison",
    "write_report",
]
