"""A spec resolved into a plan: process layout, batch arithmetic, derived DeepSpeed config, paths."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.deepspeed_config import derive_deepspeed_config
from launcher.spec import JobSpec


@dataclass
class Plan:
    """Everything a backend and the train core need, derived once from the spec."""

    spec: dict[str, Any]
    backend: str
    nodes: int
    processes_per_node: int
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    device: str
    precision: str
    deepspeed_config: dict[str, Any] | None
    run_dir: str
    seed: int
    warnings: list[str] = field(default_factory=list)

    def job_spec(self) -> JobSpec:
        """The resolved spec as a model."""
        return JobSpec.model_validate(self.spec)

    def to_json(self) -> str:
        """Serialise (plan.json)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Read plan.json."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def build_plan(spec: JobSpec, run_dir: Path, cuda_available: bool | None = None) -> Plan:
    """Resolve ``spec`` for a run writing to ``run_dir``."""
    res = spec.resources
    world = spec.world_size()
    processes_per_node = world // res.nodes if res.backend != "ray" else 1
    micro = spec.train.micro_batch_size
    global_batch = spec.train.global_batch_size or micro * world
    accumulation = global_batch // (micro * world)
    device = _device(spec, cuda_available)
    plan = Plan(
        spec=spec.model_dump(mode="json"),
        backend=res.backend,
        nodes=res.nodes,
        processes_per_node=processes_per_node,
        world_size=world,
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        global_batch_size=global_batch,
        device=device,
        precision=res.precision,
        deepspeed_config=None,
        run_dir=str(run_dir),
        seed=spec.seed,
    )
    if res.zero is not None:
        plan.deepspeed_config = derive_deepspeed_config(spec, plan)
    return plan


def _device(spec: JobSpec, cuda_available: bool | None) -> str:
    """``cpu`` or ``cuda`` as the train core will see it."""
    if spec.resources.device != "auto":
        return spec.resources.device
    if spec.resources.gpus_per_worker > 0 or spec.resources.gpus_per_node > 0:
        return "cuda"  # the job's GPUs are on its nodes or workers, whatever the submitting machine has
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"
