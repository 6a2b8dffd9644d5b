"""A finished run directory as the reports read it: resolved spec, summary, metrics, data checks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import FlotillaError
from launcher.rundir import read_jsonl


@dataclass(frozen=True)
class Run:
    """What a report shows of one run."""

    path: Path
    plan: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    data_report: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        """``<job>/<timestamp>``: the last two parts of the run directory."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def spec(self) -> dict[str, Any]:
        """The resolved spec (overrides applied, paths absolute) from plan.json."""
        return self.plan.get("spec", {})

    def series(self, key: str) -> list[tuple[float, float]]:
        """(step, value) of ``key`` in metrics.jsonl, by step; a step logged again keeps its last value."""
        by_step = {
            float(r["step"]): float(r[key])
            for r in self.records
            if _finite(r.get("step")) and _finite(r.get(key))
        }
        return sorted(by_step.items())

    def eval_metrics(self) -> list[str]:
        """The evaluation's task metrics besides the loss (``eval_accuracy``, ``eval_perplexity``...):
        the ``eval_*`` keys of the final metrics that metrics.jsonl logged over steps."""
        final = self.summary.get("after", {})
        return [k for k in sorted(final) if k.startswith("eval_") and k != "eval_loss" and self.series(k)]


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_run(path: Path) -> Run:
    """Read a finished run directory; anything else is a FlotillaError naming the path."""
    if not path.is_dir():
        raise FlotillaError(f"{path} does not exist or is not a directory")
    if (path / "rounds.jsonl").is_file():
        raise FlotillaError(f"{path} is a federation work dir: use flotilla fed report {path}")
    if not (path / "plan.json").is_file():
        raise FlotillaError(f"{path} is not a Flotilla run directory (no plan.json)")
    if not (path / "summary.json").is_file():
        raise FlotillaError(f"{path} has no summary.json (the run has not finished)")
    return Run(
        path=path.resolve(),
        plan=_read_json(path / "plan.json", required=True),
        summary=_read_json(path / "summary.json", required=True),
        records=read_jsonl(path / "metrics.jsonl"),
        data_report=_read_json(path / "data_report.json"),
        manifest=_read_json(path / "manifest.json"),
    )


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    """A JSON object from ``path`` (an empty one for a missing optional file)."""
    if not path.is_file() and not required:
        return {}
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlotillaError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise FlotillaError(f"{path} holds no JSON object")
    return payload


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists of mappings as ``{"a.b[0].c": leaf}``; other lists are leaves."""
    if isinstance(value, dict) and value:
        found: dict[str, Any] = {}
        for key, inner in value.items():
            found.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return found
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        found = {}
        for index, inner in enumerate(value):
            found.update(flatten(inner, f"{prefix}[{index}]"))
        return found
    return {prefix: value}
