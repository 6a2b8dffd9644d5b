"""Reports of finished runs as self-contained HTML pages: one run's report.html, and the
comparison of several runs (spec diff, final metrics, overlaid curves). Standard library only.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.report.compare import write_comparison
from launcher.report.page import Cell, section, table
from launcher.report.page import page as html_page
from launcher.report.runs import Run, load_run
from launcher.report.single import write_report
from launcher.report.svg import PALETTE, Series, line_chart

__all__ = [
    "PALETTE",
    "Cell",
    "Run",
    "Series",
    "html_page",
    "line_chart",
    "load_run",
    "section",
    "table",
    "write_comparison",
    "write_report",
]
