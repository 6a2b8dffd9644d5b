"""report.html: one self-contained page per run (metrics before/after, loss curves, data checks)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from launcher.rundir import read_jsonl
from launcher.train.metrics import is_task_metric


def loss_curve_svg(records: list[dict[str, Any]], width: int = 640, height: int = 240) -> str:
    """An inline SVG of training loss (blue) and validation loss (orange) against the step."""
    series = {
        key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        for key in ("loss", "eval_loss")
    }
    points = [p for values in series.values() for p in values]
    if not points:
        return "<p>no losses logged</p>"
    max_step = max(s for s, _ in points) or 1
    low, high = min(v for _, v in points), max(v for _, v in points)
    span = (high - low) or 1.0

    def xy(step: float, value: float) -> str:
        return f"{40 + step / max_step * (width - 60):.1f},{10 + (high - value) / span * (height - 40):.1f}"

    lines = []
    for key, colour in (("loss", "#1f77b4"), ("eval_loss", "#ff7f0e")):
        if series[key]:
            path = " ".join(xy(s, v) for s, v in series[key])
            lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="4" y="14" font-size="11">{high:.3f}</text>'
        f'<text x="4" y="{height - 30}" font-size="11">{low:.3f}</text>'
        f'<text x="{width - 80}" y="{height - 8}" font-size="11">step {max_step}</text>'
        + "".join(lines)
        + "</svg>"
    )


def render_report(run_dir: Path) -> str:
    """The HTML of a run's report."""
    summary = json.loads((run_dir / "summary.json").read_text())
    data_report = json.loads((run_dir / "data_report.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    before, after = summary["before"], summary["after"]
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{before.get(k, float('nan')):.4f}</td><td>{after.get(k, float('nan')):.4f}</td></tr>"
        for k in sorted(set(before) | set(after))
        if is_task_metric(k, after.get(k, before.get(k)))
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body><h1>Run {html.escape(str(run_dir))}</h1>
<p>{summary["steps"]} steps in {summary["wall_seconds"]:.1f} s; trained weights: {html.escape(summary["artifact"])}</p>
<h2>Metrics</h2><table><tr><th>metric</th><th>before</th><th>after</th></tr>{rows}</table>
<h2>Loss</h2>{loss_curve_svg(read_jsonl(run_dir / "metrics.jsonl"))}
<h2>Data</h2><pre>{html.escape(json.dumps(data_report, indent=2))}</pre>
<h2>Reproducibility</h2><pre>{html.escape(json.dumps(manifest, indent=2))}</pre>
</body></html>"""


def write_report(run_dir: Path) -> Path:
    """Write report.html into the run directory."""
    path = run_dir / "report.html"
    path.write_text(render_report(run_dir), encoding="utf-8")
    return path
