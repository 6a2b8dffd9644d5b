"""The trials of a search: every grid combination, crossed with seeded random samples of the space,
and the ``--grid``/``--space`` command-line forms of the ``sweep:`` section."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from launcher.errors import FlotillaError
from launcher.spec import Dimension, SweepSpec, parse_value


def trial_params(sweep: SweepSpec, seed: int) -> list[dict[str, Any]]:
    """Each trial's values (key path -> value), in a fixed order: the same sweep gives the same
    trials, so a re-run finds the ones already done."""
    keys = list(sweep.grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*sweep.grid.values())]
    if not sweep.random:
        return combos
    rng = random.Random(seed)
    dimensions = sweep.dimensions()
    samples = [{key: sample(dim, rng) for key, dim in dimensions.items()} for _ in range(sweep.random)]
    return [{**combo, **drawn} for combo in combos for drawn in samples]


def sample(dimension: Dimension, rng: random.Random) -> Any:
    """One value of ``dimension`` (floats rounded to 4 significant digits: readable, and the table's
    values are the ones that ran)."""
    kind, args = dimension.kind, dimension.args
    if kind == "choice":
        return rng.choice(args)
    if kind == "randint":
        return rng.randint(int(args[0]), int(args[1]))
    low, high = float(args[0]), float(args[1])
    value = (
        math.exp(rng.uniform(math.log(low), math.log(high)))
        if kind == "loguniform"
        else rng.uniform(low, high)
    )
    return float(f"{value:.4g}")


def parse_grid_options(items: list[str]) -> dict[str, list[Any]]:
    """``--grid key=v1,v2`` (repeatable) as a grid mapping."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, values = _split(item, "--grid", "train.learning_rate=1e-4,3e-4")
        grid[key] = [parse_value(v) for v in values.split(",") if v.strip()]
    return grid


def parse_space_options(items: list[str]) -> dict[str, str]:
    """``--space 'key=loguniform(1e-5,1e-3)'`` (repeatable) as a space mapping (checked by the spec)."""
    return dict(_split(item, "--space", "train.learning_rate=loguniform(1e-5,1e-3)") for item in items)


def _split(item: str, option: str, example: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise FlotillaError(f"{option} {item!r}: expected key.path=..., e.g. {option} {example!r}")
    return key.strip(), value
