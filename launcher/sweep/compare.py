"""``comparison.html``: every trial's metric curve overlaid in one inline SVG, and the table."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def curves_svg(curves: dict[str, list[tuple[int, float]]], width: int = 720, height: int = 300) -> str:
    """One polyline per trial (step against metric), finite values only, with a legend."""
    finite = {
        name: [(s, v) for s, v in pts if v == v and abs(v) != float("inf")] for name, pts in curves.items()
    }
    points = [p for pts in finite.values() for p in pts]
    if not points:
        return "<p>no evaluations logged</p>"
    max_step = max(s for s, _ in points) or 1
    low, high = min(v for _, v in points), max(v for _, v in points)
    span = (high - low) or 1.0

    def xy(step: float, value: float) -> str:
        return f"{50 + step / max_step * (width - 200):.1f},{10 + (high - value) / span * (height - 40):.1f}"

    parts = [
        f'<text x="4" y="14" font-size="11">{high:.4g}</text>',
        f'<text x="4" y="{height - 30}" font-size="11">{low:.4g}</text>',
        f'<text x="{width - 230}" y="{height - 8}" font-size="11">step {max_step}</text>',
    ]
    for number, (name, pts) in enumerate(finite.items()):
        colour = COLOURS[number % len(COLOURS)]
        if pts:
            path = " ".join(xy(s, v) for s, v in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(
            f'<text x="{width - 140}" y="{20 + 14 * number}" font-size="11" fill="{colour}">{html.escape(name)}</text>'
        )
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def comparison_html(
    directory: Path,
    rows: list[dict[str, Any]],
    curves: dict[str, list[tuple[int, float]]],
    metric: str,
    best: str | None,
) -> str:
    """The page: curves overlaid, then the table with the best trial in bold."""
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "run_dir"))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr{}>{}</tr>".format(
            ' style="font-weight:bold"' if row["trial"] == best else "",
            "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns),
        )
        for row in rows
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>sweep {html.escape(directory.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:right}}</style>
</head><body><h1>Sweep {html.escape(str(directory))}</h1>
<p>best: {html.escape(best or "none finished")} by {html.escape(metric)}</p>
<h2>{html.escape(metric)} per evaluation</h2>{curves_svg(curves)}
<h2>Trials</h2><table><tr>{head}</tr>{body}</table></body></html>"""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
