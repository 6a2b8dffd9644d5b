"""report.html of one run: key settings, curves, metrics before and after, data checks, manifest."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from launcher.report.page import Cell, page, plain, section, table, write_page
from launcher.report.runs import Run, load_run
from launcher.report.svg import PALETTE, Series, line_chart

#: The learning rate and gradient norm keep their own colours, apart from the metrics' palette.
SCHEDULE_COLOUR, NORM_COLOUR = "#3b3b98", "#555555"
PERCENTILES = ("p50", "p90", "p99", "max")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of a finished run to ``out`` (default ``<run dir>/report.html``)."""
    run = load_run(run_dir)
    return write_page(out or run.path / "report.html", render_run(run))


def render_run(run: Run) -> str:
    """The whole page of ``run``."""
    body = (
        f"<h1>Flotilla run {escape(run.name)}</h1><p class='path'>{escape(str(run.path))}</p>"
        + section("Settings", table(["setting", "value"], key_settings(run), "settings"))
        + section("Outcome", outcome(run))
        + section("Curves", f'<div class="charts">{"".join(run_charts(run))}</div>')
        + section("Data", data_tables(run.data_report))
        + section("Reproducibility", manifest_tables(run.manifest))
    )
    return page(f"Flotilla report: {run.name}", body)


def key_settings(run: Run) -> list[tuple[str, str]]:
    """The spec's settings that decide a run, as (name, value) rows."""
    spec, plan = run.spec, run.plan
    model, data, peft = spec.get("model", {}), spec.get("data", {}), spec.get("peft", {})
    train, resources = spec.get("train", {}), spec.get("resources", {})
    if peft.get("method") == "lora":
        adapter = (
            f"LoRA r={peft.get('r')} alpha={plain(peft.get('alpha'))} dropout={plain(peft.get('dropout'))}"
        )
    else:
        adapter = "none (full fine-tune)"
    warmup = train.get("warmup_steps")
    batch = (
        f"{plan.get('micro_batch_size')} per process × {plan.get('world_size')} processes × "
        f"{plan.get('gradient_accumulation_steps')} accumulation = {plan.get('global_batch_size')}"
    )
    length = (
        f"{train['max_steps']} steps" if train.get("max_steps") else f"{plain(train.get('epochs'))} epochs"
    )
    validation = _files(data.get("validation", [])) or f"{plain(data.get('validation_ratio'))} of train"
    rows = [
        ("job", spec.get("name")),
        ("model", model.get("path")),
        ("task", model.get("task")),
        ("adapter", adapter),
        ("learning rate", train.get("learning_rate")),
        ("scheduler", train.get("scheduler")),
        ("warmup", f"{warmup} steps" if warmup is not None else f"ratio {plain(train.get('warmup_ratio'))}"),
        ("batch", batch),
        ("length", length),
        ("backend", resources.get("backend")),
        ("device", plan.get("device")),
        ("precision", resources.get("precision")),
        ("seed", spec.get("seed")),
        ("data format", data.get("format")),
        ("max length", data.get("max_length")),
        ("train data", _files(data.get("train", []))),
        ("validation data", validation),
    ]
    return [(name, plain(value)) for name, value in rows]


def _files(sources: list[dict[str, Any]]) -> str:
    """Data sources as their paths, with their weights when mixed."""
    weighted = len(sources) > 1
    return ", ".join(
        f"{s.get('path')} (weight {plain(s.get('weight'))})" if weighted else str(s.get("path"))
        for s in sources
    )


def outcome(run: Run) -> str:
    """Steps, time and artefact, then the metrics before and after training."""
    summary = run.summary
    facts = [
        ("steps", summary.get("steps")),
        ("wall time (s)", f"{summary.get('wall_seconds', 0.0):.1f}"),
        ("trained weights", summary.get("artifact")),
    ]
    if summary.get("best_checkpoint"):
        facts.append(("best checkpoint", summary["best_checkpoint"]))
    if summary.get("labels"):
        facts.append(("labels", ", ".join(map(str, summary["labels"]))))
    before, after = summary.get("before", {}), summary.get("after", {})
    rows = [
        (key, before.get(key), after.get(key), _change(before.get(key), after.get(key)))
        for key in sorted(set(before) | set(after))
    ]
    return table([], facts, "settings") + table(["metric", "before", "after", "change"], rows, "metrics")


def _change(before: Any, after: Any) -> Any:
    return after - before if isinstance(before, int | float) and isinstance(after, int | float) else None


def run_charts(run: Run) -> list[str]:
    """Loss (train and eval), each evaluation metric, learning rate and gradient norm over steps."""
    charts = [
        line_chart(
            "loss",
            [
                Series("train loss", run.series("loss"), PALETTE[0]),
                Series("eval loss", run.series("eval_loss"), PALETTE[1]),
            ],
            "loss",
        )
    ]
    for index, key in enumerate(run.eval_metrics()):
        colour = PALETTE[2 + index % (len(PALETTE) - 2)]
        label = key.removeprefix("eval_").replace("_", " ")
        charts.append(line_chart(key, [Series(key, run.series(key), colour)], label))
    rate = Series("learning rate", run.series("learning_rate"), SCHEDULE_COLOUR)
    charts.append(line_chart("learning rate", [rate], "learning rate"))
    charts.append(
        line_chart("gradient norm", [Series("grad norm", run.series("grad_norm"), NORM_COLOUR)], "norm")
    )
    return charts


def data_tables(report: dict[str, Any]) -> str:
    """data_report.json as tables: totals, sources, token lengths, label balance, bad rows."""
    if not report:
        return '<p class="empty">no data report recorded</p>'
    leaked = report.get("leaked_rows", 0)
    totals = [
        ("train rows", report.get("train_rows")),
        ("validation rows", report.get("validation_rows")),
        (
            "overlong rows (truncated or dropped)",
            Cell(report.get("overlong_rows"), "warn" if report.get("overlong_rows") else ""),
        ),
        ("rows without a target", report.get("no_target_rows")),
        ("validation rows also in train (leakage)", Cell(leaked, "warn" if leaked else "")),
    ]
    sources = [
        (
            s.get("split"),
            s.get("path"),
            s.get("rows_read"),
            s.get("rows_kept"),
            s.get("duplicates_removed"),
            s.get("empty_rows"),
            Cell(s.get("bad_rows"), "warn" if s.get("bad_rows") else ""),
        )
        for s in report.get("sources", [])
    ]
    parts = [
        table(["check", "rows"], totals, "data-totals"),
        table(
            ["split", "file", "read", "kept", "duplicates removed", "empty", "bad (skipped)"],
            sources,
            "data-sources",
        ),
    ]
    lengths = report.get("token_length_percentiles", {})
    if lengths:
        order = [key for key in PERCENTILES if key in lengths] + sorted(set(lengths) - set(PERCENTILES))
        parts.append(
            table(["token length", *order], [("tokens", *(lengths[k] for k in order))], "data-lengths")
        )
    parts.append(_label_balance(report.get("label_balance", {})))
    examples = [
        f"{s.get('path')}: {e}" for s in report.get("sources", []) for e in s.get("bad_row_examples", [])
    ]
    if examples:
        parts.append(table(["bad rows (examples)"], [(e,) for e in examples], "data-bad-rows"))
    return "".join(parts)


def _label_balance(balance: dict[str, int]) -> str:
    """Label counts and shares, flagged when the largest class is over 4 times the smallest."""
    if not balance:
        return ""
    total = sum(balance.values()) or 1
    rows = [(label, count, f"{100 * count / total:.1f}%") for label, count in balance.items()]
    note = ""
    if max(balance.values()) > 4 * max(min(balance.values()), 1):
        note = '<p class="warn">labels are imbalanced</p>'
    return table(["label", "rows", "share"], rows, "data-labels") + note


def manifest_tables(manifest: dict[str, Any]) -> str:
    """manifest.json as tables: the run's context, package versions and data fingerprints."""
    if not manifest:
        return '<p class="empty">no manifest recorded</p>'
    nested = ("packages", "data_fingerprints")
    context = [
        (key, " ".join(map(str, value)) if key == "command" and isinstance(value, list) else value)
        for key, value in manifest.items()
        if key not in nested
    ]
    parts = [table([], context, "settings manifest")]
    parts.append(table(["package", "version"], list(manifest.get("packages", {}).items()), "packages"))
    fingerprints = manifest.get("data_fingerprints", {})
    if fingerprints:
        parts.append(table(["data file", "sha256"], list(fingerprints.items()), "fingerprints"))
    return "".join(parts)
