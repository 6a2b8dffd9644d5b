"""The process layout of a job: nodes, processes, batch arithmetic and device.

What both the plan and the derived DeepSpeed config need, computed from the spec alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.spec import JobSpec


@dataclass
class Layout:
    """Where a job's processes run and how its global batch is split between them."""

    nodes: int
    processes_per_node: int
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    device: str
    precision: str


def job_layout(spec: JobSpec, cuda_available: bool | None = None) -> Layout:
    """The layout ``spec`` asks for (``cuda_available`` None: ask torch, when the device is ``auto``)."""
    res = spec.resources
    world = spec.world_size()
    micro = spec.train.micro_batch_size
    global_batch = spec.train.global_batch_size or micro * world
    return Layout(
        nodes=res.nodes,
        processes_per_node=world // res.nodes if res.backend != "ray" else 1,
        world_size=world,
        micro_batch_size=micro,
        gradient_accumulation_steps=global_batch // (micro * world),
        global_batch_size=global_batch,
        device=_device(spec, cuda_available),
        precision=res.precision,
    )


def _device(spec: JobSpec, cuda_available: bool | None) -> str:
    """``cpu`` or ``cuda`` as the train core will see it."""
    if spec.resources.device != "auto":
        return spec.resources.device
    if spec.resources.gpus_per_worker > 0 or spec.resources.gpus_per_node > 0:
        return "cuda"  # the job's GPUs are on its nodes or workers, whatever the submitting machine has
    if cuda_available is None:
        import torch  # heavy: only when the device is auto and no GPUs are asked for

        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"
