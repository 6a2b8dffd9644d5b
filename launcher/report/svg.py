"""Inline SVG line charts with axes, ticks, axis labels and a legend (no JavaScript, no network)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape

#: Series colours (Tableau 10), in the order series are drawn.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
WIDTH, HEIGHT = 540, 280
LEFT, RIGHT, TOP, BOTTOM = 72, 20, 30, 48
LEGEND_ROW = 18
#: A longer series is drawn as its line alone (a dot per step would weigh the page down).
MAX_DOTS = 200
#: Data coordinate to pixel coordinate.
Scale = Callable[[float], float]


@dataclass(frozen=True)
class Series:
    """One line: its legend name, (step, value) points, colour and whether it is dashed."""

    name: str
    points: list[tuple[float, float]]
    colour: str
    dashed: bool = False


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering low..high."""
    if high <= low:  # a flat series: centred in a band around its value
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [0.0 if i == 0 else i * step for i in range(first, max(last, first + 1) + 1)]


def tick_label(value: float, ticks: list[float]) -> str:
    """A tick value with just the digits its step needs (``0.25``, ``10.6``, ``5.0e-06``)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    decimals = next((d for d in range(7) if abs(round(step, d) - step) < step * 1e-6), 7)
    if value == 0:
        return "0"
    if decimals > 4 or max(abs(t) for t in ticks) >= 1e6:
        return f"{value:.1e}"
    return f"{value:.{decimals}f}"


def line_chart(title: str, series: list[Series], y_label: str, x_label: str = "step") -> str:
    """An SVG chart of ``series`` against the step, or a note when none has a point."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return f'<p class="empty">no {escape(title)} logged</p>'
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    x_ticks = nice_ticks(min(0.0, min(xs)), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1.0) * plot_w

    def py(y: float) -> float:
        return TOP + (y1 - y) / ((y1 - y0) or 1.0) * plot_h

    height = HEIGHT + LEGEND_ROW * len(drawn) + 10
    parts = [
        f'<svg class="chart" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">',
        f'<text class="title" x="{LEFT}" y="18">{escape(title)}</text>',
    ]
    parts += _axes(x_ticks, y_ticks, px, py, x_label, y_label)
    for s in drawn:
        parts.append(_line(s, px, py))
    parts += _legend(drawn)
    parts.append("</svg>")
    return "".join(parts)


def _axes(
    x_ticks: list[float], y_ticks: list[float], px: Scale, py: Scale, x_label: str, y_label: str
) -> list[str]:
    """Grid lines, ticks with their labels, the two axes and their labels."""
    bottom, top = py(y_ticks[0]), py(y_ticks[-1])
    left, right = px(x_ticks[0]), px(x_ticks[-1])
    parts = ['<g class="axes">']
    for y in y_ticks:
        parts.append(
            f'<line class="grid" x1="{left:.1f}" y1="{py(y):.1f}" x2="{right:.1f}" y2="{py(y):.1f}"/>'
            f'<text class="tick y-tick" x="{left - 6:.1f}" y="{py(y) + 4:.1f}" text-anchor="end">'
            f"{tick_label(y, y_ticks)}</text>"
        )
    for x in x_ticks:
        parts.append(
            f'<line class="tick-mark" x1="{px(x):.1f}" y1="{bottom:.1f}" x2="{px(x):.1f}" y2="{bottom + 5:.1f}"/>'
            f'<text class="tick x-tick" x="{px(x):.1f}" y="{bottom + 18:.1f}" text-anchor="middle">'
            f"{tick_label(x, x_ticks)}</text>"
        )
    parts.append(
        f'<line class="axis" x1="{left:.1f}" y1="{bottom:.1f}" x2="{right:.1f}" y2="{bottom:.1f}"/>'
        f'<line class="axis" x1="{left:.1f}" y1="{top:.1f}" x2="{left:.1f}" y2="{bottom:.1f}"/>'
        f'<text class="axis-label x-label" x="{(left + right) / 2:.1f}" y="{bottom + 38:.1f}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="axis-label y-label" x="14" y="{(top + bottom) / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + bottom) / 2:.1f})">{escape(y_label)}</text></g>'
    )
    return parts


def _line(s: Series, px: Scale, py: Scale) -> str:
    """A series as a polyline with a dot per point (up to MAX_DOTS points); each dot's tooltip names
    the step and the value."""
    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
    dash = ' stroke-dasharray="6 4"' if s.dashed else ""
    dots = "".join(
        f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{s.colour}">'
        f"<title>{escape(s.name)}: step {x:g}, {y:.6g}</title></circle>"
        for x, y in (s.points if len(s.points) <= MAX_DOTS else [])
    )
    return (
        f'<g class="series" data-series="{escape(s.name)}">'
        f'<polyline fill="none" stroke="{s.colour}" stroke-width="2"{dash} points="{points}"/>{dots}</g>'
    )


def _legend(drawn: list[Series]) -> list[str]:
    """One row per series under the plot: a sample of its line and its name."""
    parts = ['<g class="legend">']
    for index, s in enumerate(drawn):
        y = HEIGHT + 6 + index * LEGEND_ROW
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(
            f'<g class="legend-entry" data-series="{escape(s.name)}">'
            f'<line x1="{LEFT}" y1="{y - 4}" x2="{LEFT + 28}" y2="{y - 4}" stroke="{s.colour}" '
            f'stroke-width="3"{dash}/><text x="{LEFT + 36}" y="{y}">{escape(s.name)}</text></g>'
        )
    parts.append("</g>")
    return parts
