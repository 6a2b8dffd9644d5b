"""The comparison of several runs (an A/B test): spec diff, final metrics side by side, overlaid curves."""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

from launcher.report.page import Cell, fmt, page, plain, section, table, write_page
from launcher.report.runs import Run, flatten, load_run
from launcher.report.svg import PALETTE, Series, line_chart

#: A metric whose name ends so is better lower; one that holds a word of HIGHER is better higher.
LOWER = ("loss", "perplexity")
HIGHER = ("accuracy", "precision", "recall", "f1", "auc", "rouge", "bleu")
ABSENT = object()


def letters(count: int) -> list[str]:
    """A, B, C, ... (then A2, B2, ... past Z)."""
    return [string.ascii_uppercase[i % 26] + (str(i // 26 + 1) if i >= 26 else "") for i in range(count)]


def write_comparison(run_dirs: list[Path], out: Path) -> Path:
    """Write the page comparing finished runs (two or more) to ``out``."""
    return write_page(out, render_comparison([load_run(path) for path in run_dirs]))


def render_comparison(runs: list[Run]) -> str:
    """The whole page comparing ``runs`` (two or more)."""
    diff = spec_differences(runs)
    labels = run_labels(runs, diff)
    body = (
        f"<h1>Flotilla: {len(runs)} runs compared</h1>"
        + section("Runs", runs_table(runs, labels))
        + section("Spec differences", spec_diff_table(diff, labels))
        + section("Final metrics", final_metrics(runs, labels))
        + section("Curves", f'<div class="charts">{"".join(overlaid_charts(runs, labels))}</div>')
    )
    return page(f"Flotilla comparison: {', '.join(run.name for run in runs)}", body)


def spec_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """The resolved spec's keys (flattened paths) whose values differ, with each run's value."""
    flat = [flatten(run.spec) for run in runs]
    diff = {}
    for key in sorted({key for spec in flat for key in spec}):
        values = [spec.get(key, ABSENT) for spec in flat]
        if any(v != values[0] for v in values[1:]):
            diff[key] = values
    return diff


def run_labels(runs: list[Run], diff: dict[str, list[Any]]) -> list[str]:
    """``A <job>/<timestamp>``, ...; with the differing settings when one or two differ
    (``A tiny/20260101-120000 (learning_rate=0.001)``), output and name aside."""
    shown = [key for key in diff if not key.startswith("output.") and key != "name"]
    labels = []
    for index, (letter, run) in enumerate(zip(letters(len(runs)), runs, strict=True)):
        label = f"{letter} {run.name}"
        if 1 <= len(shown) <= 2:
            label += (
                " ("
                + ", ".join(f"{key.rsplit('.', 1)[-1]}={_value(diff[key][index])}" for key in shown)
                + ")"
            )
        labels.append(label)
    return labels


def _value(value: Any) -> str:
    return "(not set)" if value is ABSENT else plain(value)


def runs_table(runs: list[Run], labels: list[str]) -> str:
    """Which run is which, with its steps, time and directory."""
    rows = [
        (label, run.summary.get("steps"), f"{run.summary.get('wall_seconds', 0.0):.1f}", Cell(str(run.path)))
        for label, run in zip(labels, runs, strict=True)
    ]
    return table(["run", "steps", "wall time (s)", "run directory"], rows, "runs")


def spec_diff_table(diff: dict[str, list[Any]], labels: list[str]) -> str:
    """The differing spec keys, one row each, one column per run."""
    if not diff:
        return '<p class="empty">the resolved specs are identical</p>'
    rows = [(key, *(Cell(_value(v), "text") for v in values)) for key, values in diff.items()]
    return table(["spec key", *labels], rows, "spec-diff")


def better(metric: str) -> str | None:
    """ "min" or "max" for a metric whose direction is known from its name, else None."""
    if metric.endswith(LOWER):
        return "min"
    if any(word in metric for word in HIGHER):
        return "max"
    return None


def final_metrics(runs: list[Run], labels: list[str]) -> str:
    """Each run's metrics after training, side by side, the best of each row marked ★."""
    finals = [run.summary.get("after", {}) for run in runs]
    rows = []
    for metric in sorted({key for final in finals for key in final}):
        values = [final.get(metric) for final in finals]
        known = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
        direction = better(metric)
        tied = len(set(known)) < 2  # nothing to choose between
        best = None if tied or not direction else (min if direction == "min" else max)(known)
        cells = [Cell(f"{fmt(v)} ★", "best") if best is not None and v == best else Cell(v) for v in values]
        rows.append((metric, *cells))
    return (
        table(["metric", *labels], rows, "final-metrics")
        + "<p>★ best of the row (lower loss and perplexity, higher accuracy, F1, ...)</p>"
    )


def overlaid_charts(runs: list[Run], labels: list[str]) -> list[str]:
    """Train loss, eval loss, each evaluation metric and the learning rate, one line per run."""
    metrics = sorted({key for run in runs for key in run.eval_metrics()})
    charts = []
    keys = [("train loss", "loss"), ("eval loss", "eval_loss"), *[(m, m) for m in metrics]]
    for title, key in [*keys, ("learning rate", "learning_rate")]:
        series = [  # colours repeat past ten runs, dashed the second time round
            Series(label, run.series(key), PALETTE[index % len(PALETTE)], dashed=index >= len(PALETTE))
            for index, (label, run) in enumerate(zip(labels, runs, strict=True))
        ]
        charts.append(line_chart(title, series, key.removeprefix("eval_").replace("_", " ")))
    return charts
