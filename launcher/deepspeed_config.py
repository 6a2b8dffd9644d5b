"""The DeepSpeed config, derived from the spec: no ``auto`` left, no value set in two places."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from launcher.spec import JobSpec

if TYPE_CHECKING:
    from launcher.plan import Plan


def derive_deepspeed_config(spec: JobSpec, plan: Plan) -> dict[str, Any]:
    """A complete DeepSpeed config for ``spec`` (optimizer and scheduler stay the Trainer's)."""
    zero = spec.resources.zero
    assert zero is not None
    zero_section: dict[str, Any] = {"stage": zero.stage}
    if zero.offload_optimizer == "cpu":
        zero_section["offload_optimizer"] = {"device": "cpu", "pin_memory": plan.device == "cuda"}
    if zero.offload_params == "cpu":
        zero_section["offload_param"] = {"device": "cpu", "pin_memory": plan.device == "cuda"}
    if zero.stage == 3:
        zero_section["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": spec.train.max_grad_norm,
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
        "zero_optimization": zero_section,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
