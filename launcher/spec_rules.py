"""Cross-field rules of the job spec, in one place: hard errors and soft guardrail warnings."""

from __future__ import annotations

from launcher.spec import JobSpec

CLASSIFICATION_METRICS = {"accuracy", "precision", "recall", "f1", "auc"}
GENERATION_METRICS = {"perplexity", "rouge", "bleu"}
#: Learning-rate ranges (inclusive) that are usual for each method; outside them we warn.
USUAL_LEARNING_RATES = {"lora": (1e-5, 1e-3), "none": (1e-6, 1e-4)}


def spec_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Every cross-field problem as ``(key path, message)``."""
    problems: list[tuple[str, str]] = []
    problems += _task_problems(spec)
    problems += _batch_problems(spec)
    problems += _precision_problems(spec)
    problems += _zero_problems(spec)
    problems += _eval_problems(spec)
    return problems


def guardrail_warnings(spec: JobSpec) -> list[str]:
    """Things that are allowed but usually a mistake."""
    warnings: list[str] = []
    low, high = USUAL_LEARNING_RATES[spec.peft.method]
    lr = spec.train.learning_rate
    method = "LoRA" if spec.peft.method == "lora" else "a full fine-tune"
    if not low <= lr <= high:
        warnings.append(
            f"train.learning_rate={lr:g} is outside the usual range for {method} "
            f"({low:g}..{high:g}); expect {'divergence' if lr > high else 'slow progress'}"
        )
    if spec.train.warmup_ratio == 0 and not spec.train.warmup_steps:
        warnings.append("no learning-rate warmup (train.warmup_ratio=0): early steps may be unstable")
    return warnings


def _task_problems(spec: JobSpec) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    classification = spec.model.task == "sequence_classification"
    for section in ("train", "validation"):
        for index, source in enumerate(getattr(spec.data, section)):
            fmt = source.format or spec.data.format
            if classification != (fmt == "classification"):
                problems.append(
                    (
                        f"data.{section}[{index}].format" if source.format else "data.format",
                        f"format {fmt!r} does not fit model.task={spec.model.task!r}; "
                        + (
                            "sequence_classification needs format 'classification'"
                            if classification
                            else "causal_lm takes 'chat', 'instruction' or 'text'"
                        ),
                    )
                )
    wrong = set(spec.eval.metrics) & (GENERATION_METRICS if classification else CLASSIFICATION_METRICS)
    if wrong:
        problems.append(("eval.metrics", f"{sorted(wrong)} do not apply to model.task={spec.model.task!r}"))
    if spec.model.num_labels is not None and not classification:
        problems.append(("model.num_labels", "only applies to model.task='sequence_classification'"))
    return problems


def _batch_problems(spec: JobSpec) -> list[tuple[str, str]]:
    train = spec.train
    world = spec.world_size()
    if train.global_batch_size is None:
        return []
    unit = train.micro_batch_size * world
    if train.global_batch_size % unit:
        return [
            (
                "train.global_batch_size",
                f"{train.global_batch_size} is not divisible by micro_batch_size × processes "
                f"= {train.micro_batch_size} × {world} = {unit}; use a multiple of {unit}",
            )
        ]
    return []


def _precision_problems(spec: JobSpec) -> list[tuple[str, str]]:
    res = spec.resources
    on_cpu = res.device == "cpu" or (
        res.device == "auto" and res.gpus_per_node == 0 and res.gpus_per_worker == 0
    )
    if res.precision == "fp16" and on_cpu:
        return [
            (
                "resources.precision",
                "fp16 needs a GPU (no gpus requested / device cpu); use 'bf16' or 'fp32' on CPU",
            )
        ]
    return []


def _zero_problems(spec: JobSpec) -> list[tuple[str, str]]:
    res = spec.resources
    zero = res.zero
    problems: list[tuple[str, str]] = []
    uses_deepspeed = res.backend == "deepspeed" or res.launcher == "deepspeed"
    if zero is not None and not uses_deepspeed:
        problems.append(
            (
                "resources.zero",
                "ZeRO needs DeepSpeed: set resources.backend: deepspeed "
                "(or resources.launcher: deepspeed with the slurm/ray backends)",
            )
        )
    if res.deepspeed_overrides and not uses_deepspeed:
        problems.append(("resources.deepspeed_overrides", "only applies when DeepSpeed is used"))
    if zero is None:
        return problems
    if zero.offload_optimizer == "cpu" and zero.stage == 0:
        problems.append(("resources.zero.offload_optimizer", "optimizer offload needs stage >= 1"))
    if zero.offload_params == "cpu" and zero.stage != 3:
        problems.append(("resources.zero.offload_params", "parameter offload needs stage 3"))
    return problems


def _eval_problems(spec: JobSpec) -> list[tuple[str, str]]:
    has_validation = bool(spec.data.validation) or spec.data.validation_ratio > 0
    problems: list[tuple[str, str]] = []
    if spec.train.early_stopping and not has_validation:
        problems.append(
            ("train.early_stopping", "needs validation data (data.validation or data.validation_ratio > 0)")
        )
    if spec.train.early_stopping and spec.eval.steps is None:
        problems.append(("train.early_stopping", "needs eval.steps (how often to evaluate)"))
    if spec.eval.steps is not None and not has_validation:
        problems.append(
            ("eval.steps", "needs validation data (data.validation or data.validation_ratio > 0)")
        )
    return problems
