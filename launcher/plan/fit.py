"""Fitting a job to the hardware: the memory estimate of a spec, and the cheapest setup that fits.

"Cheapest" means, in this order: no offload before optimizer offload before parameter offload
(PCIe traffic costs most), then the lowest ZeRO stage (less communication), then no gradient
checkpointing (no recomputation), then the largest micro batch that keeps the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from launcher.errors import FlotillaError
from launcher.plan.memory import (
    RESERVED_BYTES,
    Estimate,
    ModelShape,
    Setup,
    estimate,
    model_shape,
    parameter_counts,
)
from launcher.spec import JobSpec

if TYPE_CHECKING:
    import torch

#: (offload_optimizer, offload_params), cheapest first.
OFFLOADS = ((False, False), (True, False), (True, True))


@dataclass(frozen=True)
class Fit:
    """A setup that fits, its estimate, and the spec overrides that select it."""

    setup: Setup
    estimate: Estimate
    overrides: list[str]


def shape_for_spec(spec: JobSpec) -> ModelShape:
    """The model's shape and parameter counts (built on the meta device: no weights are loaded)."""
    # torch, transformers and the model layer are heavy: off the path of `flotilla validate` and `plan`
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from launcher.model import apply_peft, freeze_parameters, loadable_source

    source = loadable_source(spec.model)
    try:
        config = AutoConfig.from_pretrained(
            source.name_or_path, trust_remote_code=spec.model.trust_remote_code, revision=spec.model.revision
        )
    except OSError as exc:
        raise FlotillaError(f"cannot read the model config for the memory estimate: {exc}") from None
    classifier = spec.model.task == "sequence_classification"
    if classifier:
        config.num_labels = spec.model.num_labels or 2
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=spec.model.trust_remote_code)
        freeze_parameters(model, spec.model.freeze)
        model = apply_peft(model, spec.peft.model_copy(update={"init_from": None}), spec.model.task)
    trainable, total, largest = parameter_counts(model)
    shape = model_shape(config, trainable, total, largest, _lora_dropout_width(model, spec))
    return replace(shape, vocab_size=config.num_labels) if classifier else shape


def _lora_dropout_width(model: torch.nn.Module, spec: JobSpec) -> int:
    """Summed input width of the first decoder layer's LoRA modules, when LoRA dropout is on."""
    if spec.peft.method != "lora" or spec.peft.dropout == 0:
        return 0
    return sum(
        getattr(module, "in_features", 0)
        for name, module in model.named_modules()
        if ".layers.0." in name and hasattr(module, "lora_dropout") and hasattr(module, "in_features")
    )


def setup_for_spec(spec: JobSpec, gpus_per_node: int | None = None) -> Setup:
    """The spec's own setup (``gpus_per_node`` overrides its processes per node)."""
    res = spec.resources
    zero = res.zero
    per_node = gpus_per_node or spec.world_size() // res.nodes
    return Setup(
        stage=zero.stage if zero else 0,
        offload_optimizer=bool(zero and zero.offload_optimizer == "cpu"),
        offload_params=bool(zero and zero.offload_params == "cpu"),
        precision=res.precision,
        gpus_per_node=per_node,
        nodes=res.nodes,
        micro_batch_size=spec.train.micro_batch_size,
        seq_len=spec.data.max_length,
        gradient_checkpointing=spec.model.gradient_checkpointing,
    )


def usable_bytes(gpu_memory: int) -> int:
    """What a GPU of ``gpu_memory`` bytes leaves for training (context and fragmentation reserved)."""
    return gpu_memory - RESERVED_BYTES


def cheapest_fit(shape: ModelShape, base: Setup, gpu_memory: int, global_batch: int) -> Fit | None:
    """The cheapest setup (see the module docstring) whose estimate fits in ``gpu_memory``."""
    budget = usable_bytes(gpu_memory)
    for offload_optimizer, offload_params in OFFLOADS:
        for stage in range(4):
            if (offload_optimizer and stage == 0) or (offload_params and stage != 3):
                continue
            for checkpointing in (False, True):
                for micro in micro_batch_sizes(global_batch, base.world):
                    setup = replace(
                        base,
                        stage=stage,
                        offload_optimizer=offload_optimizer,
                        offload_params=offload_params,
                        gradient_checkpointing=checkpointing,
                        micro_batch_size=micro,
                    )
                    result = estimate(shape, setup)
                    if result.total <= budget:
                        return Fit(setup, result, _overrides(setup))
    return None


def micro_batch_sizes(global_batch: int, world: int) -> list[int]:
    """Micro batches that keep ``global_batch`` (whole gradient accumulation), largest first."""
    per_rank = global_batch // world if global_batch % world == 0 else 0
    if per_rank:
        return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
    return [1]


def _overrides(setup: Setup) -> list[str]:
    """``key=value`` overrides that turn the spec into ``setup``."""
    overrides = [f"resources.zero.stage={setup.stage}"]
    overrides.append(f"resources.zero.offload_optimizer={'cpu' if setup.offload_optimizer else 'none'}")
    if setup.stage == 3:
        overrides.append(f"resources.zero.offload_params={'cpu' if setup.offload_params else 'none'}")
    overrides.append(f"model.gradient_checkpointing={str(setup.gradient_checkpointing).lower()}")
    overrides.append(f"train.micro_batch_size={setup.micro_batch_size}")
    return overrides
