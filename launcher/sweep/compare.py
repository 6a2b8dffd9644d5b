"""``comparison.html``: every trial's metric curve overlaid (stopped and unfinished trials too, which
the run comparison of ``flotilla report A B`` leaves out), and the trials table with the best marked.
Drawn with the run report's own charts and tables."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from launcher.report import PALETTE, Cell, Series, html_page, line_chart, section, table


def comparison_html(
    directory: Path,
    rows: list[dict[str, Any]],
    curves: dict[str, list[tuple[int, float]]],
    metric: str,
    best: str | None,
) -> str:
    """The page: the metric's curves overlaid, then the table with the best trial marked."""
    series = [
        Series(name, [(s, v) for s, v in points if math.isfinite(v)], PALETTE[number % len(PALETTE)])
        for number, (name, points) in enumerate(curves.items())
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "run_dir"))
    cells = [[Cell(row.get(c), "best" if row["trial"] == best else "") for c in columns] for row in rows]
    body = (
        f'<h1>Sweep {escape(directory.name)}</h1><p class="path">{escape(str(directory))}</p>'
        f"<p>best: {escape(best or 'none finished')} by {escape(metric)}</p>"
        + section(f"{metric} per evaluation", line_chart(metric, series, metric))
        + section("Trials", table(columns, cells))
    )
    return html_page(f"sweep {directory.name}", body)
