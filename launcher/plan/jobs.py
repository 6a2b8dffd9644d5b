"""From a spec file to a prepared run directory (spec.yaml, plan.json) that any backend can start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.atomic import write_json_atomic
from launcher.errors import FlotillaError
from launcher.plan.deepspeed import deepspeed_override_problems
from launcher.plan.plan import Plan, build_plan
from launcher.redact import redact_text
from launcher.rundir import new_run_dir
from launcher.spec import (
    JobSpec,
    Location,
    guardrail_warnings,
    load_spec,
    resolve_relative_paths,
    validate_spec,
)


@dataclass
class PreparedRun:
    """A run directory with its resolved spec and plan."""

    spec: JobSpec
    plan: Plan
    run_dir: Path


#: What the plan checks beyond the spec's own rules (with line numbers, like them).
PLAN_RULES = (deepspeed_override_problems,)


def load_job(spec_path: Path, overrides: list[str]) -> JobSpec:
    """Load and validate a spec (the plan's rules included), with its local paths made absolute."""
    return resolve_relative_paths(load_spec(spec_path, overrides, PLAN_RULES), spec_path, overrides)


def validate_job(
    data: dict[str, Any], source: str, overrides: list[str], lines: dict[Location, int] | None = None
) -> JobSpec:
    """Validate a spec mapping with the spec's and the plan's rules."""
    return validate_spec(data, source, overrides, lines, PLAN_RULES)


def with_backend(overrides: list[str], backend: str | None) -> list[str]:
    """``overrides`` plus ``resources.backend=<backend>``: validated with the rest of the spec."""
    return [*overrides, f"resources.backend={backend}"] if backend else overrides


def prepare_run(
    spec_path: Path, overrides: list[str], backend: str | None = None, run_dir: Path | None = None
) -> PreparedRun:
    """Validate the spec (``backend`` overriding its resources.backend) and create a fresh run
    directory for it (``run_dir``, a sweep's trial, else ``<output.dir>/<name>/<timestamp>``)."""
    overrides = with_backend(overrides, backend)
    spec = load_job(spec_path, overrides)
    if run_dir is None:
        run_dir = new_run_dir(spec.output.dir, spec.name)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_dir = run_dir.resolve()
    (run_dir / "spec.yaml").write_text(redact_text(spec_path.read_text(encoding="utf-8")), encoding="utf-8")
    plan = build_plan(spec, run_dir)
    plan.warnings = guardrail_warnings(spec)
    (run_dir / "plan.json").write_text(plan.to_json(), encoding="utf-8")
    write_json_atomic(run_dir / "overrides.json", overrides)
    return PreparedRun(spec, plan, run_dir)


def reopen_run(run_dir: Path) -> PreparedRun:
    """An existing run directory, for resume, status or logs."""
    plan_file = run_dir / "plan.json"
    if not plan_file.is_file():
        raise FlotillaError(f"{run_dir} is not a Flotilla run directory (no plan.json)")
    plan = Plan.load(plan_file)
    return PreparedRun(plan.job_spec(), plan, run_dir.resolve())
