"""Headless Chromium (Debian's, from tests/install_chromium.sh) for the report tests: the DOM a page
renders to, as a small tree, and a screenshot's colours."""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tests.conftest import import_or_unavailable, unavailable

CHROMIUM = Path("/usr/bin/chromium")
#: Nothing leaves the machine: no background services, and any request goes to a closed local port.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--proxy-server=127.0.0.1:9",
    "--hide-scrollbars",
)
#: HTML elements without an end tag.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


def chromium(page: Path, profile: Path, *args: str) -> str:
    """Run Chromium on ``page`` with ``args`` (its own profile folder); returns its stdout."""
    if not CHROMIUM.is_file():
        unavailable(f"{CHROMIUM} is missing (bash tests/install_chromium.sh installs Debian's chromium)")
    result = subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def rendered_dom(page: Path, profile: Path) -> Element:
    """The DOM Chromium builds from ``page``, parsed back into a tree."""
    return parse(chromium(page, profile, "--dump-dom"))


def screenshot_colours(page: Path, profile: Path, shot: Path) -> Counter[tuple[int, int, int]]:
    """Pixels per RGB colour of a 1200×2000 screenshot of ``page``."""
    image_module = import_or_unavailable("PIL.Image")
    chromium(page, profile, f"--screenshot={shot}", "--window-size=1200,2000")
    image = image_module.open(shot).convert("RGB")
    assert image.size == (1200, 2000), image.size
    return Counter({rgb: count for count, rgb in image.getcolors(maxcolors=1 << 24)})


def rgb(hex_colour: str) -> tuple[int, int, int]:
    """``#1f77b4`` as (31, 119, 180)."""
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@dataclass
class Element:
    """One element: tag, attributes, and its children (elements and text) in order."""

    tag: str
    attrs: dict[str, str]
    parts: list[Element | str] = field(default_factory=list)

    def iter(self) -> list[Element]:
        """This element and every element inside it, in document order."""
        found = [self]
        for part in self.parts:
            if isinstance(part, Element):
                found += part.iter()
        return found

    def find(self, tag: str, css: str | None = None) -> list[Element]:
        """The elements inside with this tag (and this class among their classes)."""
        return [
            e
            for e in self.iter()
            if e.tag == tag and (css is None or css in e.attrs.get("class", "").split())
        ]

    def text(self) -> str:
        """All the text inside, with single spaces."""
        words = [p if isinstance(p, str) else p.text() for p in self.parts]
        return " ".join(" ".join(words).split())


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].parts.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].parts.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].parts.append(data)


def parse(html: str) -> Element:
    """An HTML document as a tree of Elements."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def charts(dom: Element) -> dict[str, Element]:
    """The SVG charts of a page by their title."""
    return {svg.find("text", "title")[0].text(): svg for svg in dom.find("svg", "chart")}


def series_points(chart: Element) -> dict[str, int]:
    """Points of each series of a chart (its polyline), by series name."""
    return {
        g.attrs["data-series"]: len(g.find("polyline")[0].attrs["points"].split())
        for g in chart.find("g", "series")
    }


def legend(chart: Element) -> list[str]:
    """The names in a chart's legend."""
    return [entry.text() for entry in chart.find("g", "legend-entry")]


def table_rows(dom: Element, css: str) -> list[list[str]]:
    """The body rows of the table with class ``css``, as cell texts."""
    tables = dom.find("table", css)
    assert tables, f"no table of class {css}"
    return [[cell.text() for cell in row.find("td")] for row in tables[0].find("tbody")[0].find("tr")]
