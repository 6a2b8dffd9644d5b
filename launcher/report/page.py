"""The HTML both reports share: the page shell with its inline style, tables, number formatting."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from launcher.errors import FlotillaError

STYLE = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.path{color:#666;font-size:.9em;word-break:break-all}
table{border-collapse:collapse;margin:.6em 0}
th,td{padding:3px 12px;border-bottom:1px solid #eee;text-align:right;vertical-align:top}
th{background:#f4f4f4;text-align:left}td:first-child{text-align:left}
td.text{text-align:left;word-break:break-all}
.settings td,.settings th{text-align:left}.settings td:first-child{color:#555}.best{font-weight:bold;color:#1a7f37}
.warn{color:#b42318;font-weight:bold}.empty{color:#888;font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:1em}
svg.chart{background:#fff;border:1px solid #e4e4e4;font-size:11px}
svg .title{font-size:13px;font-weight:bold}svg .grid{stroke:#ececec}svg .axis{stroke:#444}
svg .tick-mark{stroke:#444}svg .tick,svg .legend text{fill:#333}svg .axis-label{fill:#333;font-size:12px}
""".strip()


def page(title: str, body: str) -> str:
    """A whole self-contained HTML document."""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def fmt(value: Any) -> str:
    """A cell's text: numbers to 4 significant decimals, the rest as JSON or as given."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e-3 and value else f"{value:.4f}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def plain(value: Any) -> str:
    """A spec value as written: strings as they are, anything else as JSON (0.001, true, null, [..])."""
    return value if isinstance(value, str) else json.dumps(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> str:
    """An HTML table (no header row without ``headers``); every cell is escaped (a cell given as ``Cell`` keeps its class)."""
    head = (
        "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    )
    body = "".join(
        "<tr>"
        + "".join(cell.html() if isinstance(cell, Cell) else Cell(cell).html() for cell in row)
        + "</tr>"
        for row in rows
    )
    klass = f' class="{escape(css)}"' if css else ""
    return f"<table{klass}>{head}<tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class Cell:
    """A table cell with a class (``best``, ``warn``; text is left-aligned by default)."""

    value: Any
    css: str = ""

    def html(self) -> str:
        """The ``<td>``."""
        css = self.css or ("text" if isinstance(self.value, str | list | dict) else "")
        klass = f' class="{escape(css)}"' if css else ""
        return f"<td{klass}>{escape(fmt(self.value))}</td>"


def section(title: str, content: str) -> str:
    """A titled part of the page."""
    return f"<section><h2>{escape(title)}</h2>{content}</section>"


def write_page(path: Path, html: str) -> Path:
    """Write a page to ``path`` (its folder must exist); a failure is a FlotillaError naming it."""
    if not path.parent.is_dir():
        raise FlotillaError(f"{path.parent} does not exist: cannot write {path}")
    try:
        path.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise FlotillaError(f"cannot write {path}: {exc.strerror}") from exc
    return path
