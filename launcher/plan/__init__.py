"""The resolved plan: process layout and batch arithmetic, the derived DeepSpeed config, run
directories prepared for any backend, and the memory estimate with ``--fit``.

Light on purpose (no torch at import): ``flotilla validate`` and ``plan`` start fast.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.plan.fit import cheapest_fit, setup_for_spec, shape_for_spec, usable_bytes
from launcher.plan.jobs import (
    PreparedRun,
    load_job,
    prepare_run,
    reopen_run,
    validate_job,
    with_backend,
)
from launcher.plan.memory import estimate, format_bytes, parse_size
from launcher.plan.plan import Plan, build_plan

__all__ = [
    "Plan",
    "PreparedRun",
    "build_plan",
    "cheapest_fit",
    "estimate",
    "format_bytes",
    "load_job",
    "parse_size",
    "prepare_run",
    "reopen_run",
    "setup_for_spec",
    "shape_for_spec",
    "usable_bytes",
    "validate_job",
    "with_backend",
]
