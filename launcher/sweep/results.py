"""The sweep's results, read from the trials' run directories: a table of trials × parameters ×
metric (``results.csv``, ``results.json``), the best run (``best_run.txt``) and ``comparison.html``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from launcher.atomic import write_json_atomic
from launcher.rundir import read_jsonl
from launcher.spec import SweepSpec
from launcher.sweep.compare import comparison_html
from launcher.sweep.trials import Trial

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
BEST_RUN = "best_run.txt"
COMPARISON = "comparison.html"


def metric_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every evaluation of ``metric`` logged in the run's metrics.jsonl."""
    return [
        (int(r["step"]), float(r[metric]))
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if isinstance(r.get(metric), int | float)
    ]


def trial_row(trial: Trial, settings: SweepSpec) -> dict[str, Any]:
    """One row of the table: the trial, its values, its final and best metric, steps and time."""
    metric, sign = settings.metric, (1 if settings.mode == "min" else -1)
    summary_file = trial.run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    curve = [(s, v) for s, v in metric_curve(trial.run_dir, metric) if not math.isnan(v)]
    best = min(curve, key=lambda sv: sign * sv[1]) if curve else None
    steps = [int(r["step"]) for r in read_jsonl(trial.run_dir / "metrics.jsonl") if "step" in r]
    return {
        "trial": trial.name,
        "state": trial.state(),
        **trial.params,
        metric: summary.get("after", {}).get(metric),
        f"best_{metric}": best[1] if best else None,
        "best_step": best[0] if best else None,
        "steps": summary.get("steps", max(steps, default=0)),
        "wall_seconds": round(summary["wall_seconds"], 2) if "wall_seconds" in summary else None,
        "run_dir": str(trial.run_dir),
    }


def best_row(rows: list[dict[str, Any]], settings: SweepSpec) -> dict[str, Any] | None:
    """The finished trial whose saved weights score best on the metric (stopped trials saved none)."""
    metric, sign = settings.metric, (1 if settings.mode == "min" else -1)
    scored = [r for r in rows if r["state"] == "finished" and isinstance(r[metric], int | float)]
    scored = [r for r in scored if not math.isnan(r[metric])]
    return min(scored, key=lambda r: sign * r[metric]) if scored else None


def write_results(directory: Path, trials: list[Trial], settings: SweepSpec) -> dict[str, Any]:
    """Write the table (CSV and JSON), the best run's path and the comparison page; the results."""
    rows = [trial_row(t, settings) for t in trials]
    best = best_row(rows, settings)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (directory / RESULTS_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    results = {
        "metric": settings.metric,
        "mode": settings.mode,
        "best": {"trial": best["trial"], settings.metric: best[settings.metric], "run_dir": best["run_dir"]}
        if best
        else None,
        "trials": rows,
    }
    write_json_atomic(directory / RESULTS_JSON, results)
    best_file = directory / BEST_RUN
    if best:
        best_file.write_text(best["run_dir"] + "\n", encoding="utf-8")
    else:
        best_file.unlink(missing_ok=True)
    curves = {t.name: metric_curve(t.run_dir, settings.metric) for t in trials}
    (directory / COMPARISON).write_text(
        comparison_html(directory, rows, curves, settings.metric, best["trial"] if best else None),
        encoding="utf-8",
    )
    return results
