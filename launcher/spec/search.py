"""The search-space syntax of a sweep (the ``sweep:`` section, ``flotilla sweep --space``).

A random dimension is written ``loguniform(1e-5,1e-3)``, ``uniform(0,0.1)``, ``randint(4,32)``
(both ends included) or ``choice(8,16,32)``; :func:`parse_dimension` reads one, with a
did-you-mean for a misspelt distribution.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

#: Distributions of a random dimension and the number of arguments each takes (None: one or more).
DISTRIBUTIONS: dict[str, int | None] = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None}
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Dimension:
    """One random dimension: a distribution and its arguments."""

    kind: str
    args: tuple[Any, ...]


def parse_value(text: str) -> Any:
    """A value written on the command line or in a list: a number if it reads as one (``1e-4`` too,
    which YAML would keep as a string), else what YAML makes of it."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_dimension(text: str) -> Dimension:
    """``loguniform(1e-5,1e-3)`` and the like; ``ValueError`` with what is allowed otherwise."""
    match = _CALL.match(text)
    allowed = ", ".join(f"{name}(...)" for name in DISTRIBUTIONS)
    if not match:
        raise ValueError(
            f"{text!r} is not a distribution; write one of {allowed}, e.g. loguniform(1e-5,1e-3)"
        )
    kind, inner = match.group(1), match.group(2)
    if kind not in DISTRIBUTIONS:
        hint = difflib.get_close_matches(kind, list(DISTRIBUTIONS), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown distribution {kind!r}{suggestion} (allowed: {allowed})")
    args = tuple(parse_value(part) for part in inner.split(",")) if inner.strip() else ()
    count = DISTRIBUTIONS[kind]
    if count is None and not args:
        raise ValueError(f"{kind}() needs at least one value, e.g. choice(8,16)")
    if count is not None:
        if len(args) != count:
            raise ValueError(f"{kind} takes {count} arguments (low, high), got {len(args)} in {text!r}")
        _check_bounds(kind, args, text)
    return Dimension(kind, args)


def _check_bounds(kind: str, args: tuple[Any, ...], text: str) -> None:
    low, high = args
    numeric = int if kind == "randint" else (int, float)
    if not all(isinstance(a, numeric) and not isinstance(a, bool) for a in args):
        what = "integers" if kind == "randint" else "numbers"
        raise ValueError(f"{kind} takes two {what} (low, high), got {text!r}")
    if not low < high:
        raise ValueError(f"{kind}: low must be below high, got {text!r}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform needs low > 0 (it samples the logarithm), got {text!r}")
    if not all(math.isfinite(a) for a in args):
        raise ValueError(f"{kind}: bounds must be finite, got {text!r}")
