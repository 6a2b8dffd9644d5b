"""A spec resolved into a plan: process layout, batch arithmetic, derived DeepSpeed config, paths."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.plan.deepspeed import derive_deepspeed_config
from launcher.plan.layout import Layout, job_layout
from launcher.redact import redact
from launcher.spec import JobSpec


@dataclass
class Plan(Layout):
    """Everything a backend and the train core need, derived once from the spec: its layout, plus
    the spec itself, the backend, the derived DeepSpeed config and where the run writes."""

    spec: dict[str, Any]
    backend: str
    deepspeed_config: dict[str, Any] | None
    run_dir: str
    seed: int
    warnings: list[str] = field(default_factory=list)

    def job_spec(self) -> JobSpec:
        """The resolved spec as a model."""
        return JobSpec.model_validate(self.spec)

    def to_json(self) -> str:
        """Serialise (plan.json), secret environment values redacted (:mod:`launcher.redact`)."""
        return json.dumps(redact(asdict(self)), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Read plan.json."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def build_plan(spec: JobSpec, run_dir: Path, cuda_available: bool | None = None) -> Plan:
    """Resolve ``spec`` for a run writing to ``run_dir``."""
    layout = job_layout(spec, cuda_available)
    plan = Plan(
        spec=spec.model_dump(mode="json"),
        backend=spec.resources.backend,
        **asdict(layout),
        deepspeed_config=None,
        run_dir=str(run_dir),
        seed=spec.seed,
    )
    if spec.resources.zero is not None:
        plan.deepspeed_config = derive_deepspeed_config(spec, layout)
    return plan
