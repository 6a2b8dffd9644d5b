"""Tables of a federation's rounds: per-round, per-site metrics and communication vs full weights."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

#: Site metrics shown when present: (metric key, column title).
SITE_COLUMNS = (
    ("global-eval_loss", "global\nloss"),
    ("eval_loss", "local\nloss"),
    ("eval_accuracy", "local\nacc"),
    ("train_loss", "train\nloss"),
)


def rounds_table(rows: list[dict[str, Any]]) -> Table:
    """One line per (round, site): status, examples claimed and the weight counted, metrics
    before/after local training, bytes each way."""
    table = Table(
        title="rounds (global = the adapter the site received, local = after its training)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for title in ("round", "site", "status", "rows", "weight", *(t for _, t in SITE_COLUMNS), "sent", "recv"):
        left = title in ("site", "status")
        table.add_column(title, justify="left" if left else "right", no_wrap=True)
    for row in rows:
        for site in row.get("sites", []):
            metrics = site.get("metrics", {})
            table.add_row(
                str(row["round"]),
                site["site"],
                site.get("status", "?"),
                _int(metrics.get("claimed-examples", metrics.get("num-examples"))),
                _int(metrics.get("num-examples")) if "claimed-examples" in metrics else "-",
                *(_num(metrics.get(key)) for key, _ in SITE_COLUMNS),
                _bytes(site.get("bytes_up")),
                _bytes(site.get("bytes_down")),
            )
    return table


def problems(rows: list[dict[str, Any]]) -> list[str]:
    """``round N, site: status: reason`` for every site whose update was not used."""
    return [
        f"round {row['round']}, {site['site']}: {site.get('status', '?')}: {site['reason']}"
        for row in rows
        for site in row.get("sites", [])
        if site.get("reason")
    ]


def summary_table(rows: list[dict[str, Any]]) -> Table:
    """One line per round: time, server-side evaluation, bytes per site against full weights, and
    the epsilon spent so far under DP."""
    table = Table(
        title="global adapter per round", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    for title in (
        "round",
        "seconds",
        "sites ok",
        "server\neval loss",
        "server\nacc",
        "up/site",
        "full\nweights",
        "ratio",
        "epsilon",
    ):
        table.add_column(title, justify="right", no_wrap=True)
    for row in rows:
        sites = [s for s in row.get("sites", []) if s.get("status") == "accepted"]
        up = max((s.get("bytes_up", 0) for s in sites), default=0)
        full = row.get("full_weight_bytes", 0)
        evaluation = row.get("server_eval", {})
        table.add_row(
            str(row["round"]),
            _num(row.get("seconds"), 1),
            str(len(sites)) if row["round"] else "-",
            _num(evaluation.get("eval_loss")),
            _num(evaluation.get("eval_accuracy")),
            _bytes(up) if up else "-",
            _bytes(full),
            f"{up / full:.2%}" if up and full else "-",
            _num(row.get("privacy", {}).get("epsilon"), 2),
        )
    return table


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _int(value: Any) -> str:
    return "-" if value is None else str(int(value))


def _bytes(value: Any) -> str:
    if not value:
        return "-"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" and size < 10 else f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.0f} GB"
