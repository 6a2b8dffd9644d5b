"""Cross-field rules of the job spec, in one place: hard errors and soft guardrail warnings."""

from __future__ import annotations

import difflib
from urllib.parse import urlsplit

from launcher.spec.models import JobSpec, TrackingSpec

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
    problems += zero_problems(spec)
    problems += _eval_problems(spec)
    problems += _slurm_problems(spec)
    problems += _ray_problems(spec)
    problems += tracking_problems(spec.tracking)
    problems += _sweep_problems(spec)
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
    if spec.train.logit_adjustment and not classification:
        problems.append(("train.logit_adjustment", "only applies to model.task='sequence_classification'"))
    if spec.model.attention == "per_document" and classification:
        problems.append(("model.attention", "per_document applies to model.task='causal_lm' (packed rows)"))
    if spec.data.group_by_length and not spec.data.shuffle:
        problems.append(
            ("data.shuffle", "false reads rows in file order; data.group_by_length reorders them: choose one")
        )
    labels = spec.data.labels
    if labels is not None and not classification:
        problems.append(("data.labels", "only applies to model.task='sequence_classification'"))
    elif labels is not None and (len(set(labels)) != len(labels) or len(labels) < 2):
        problems.append(("data.labels", f"needs at least two distinct label names, got {labels}"))
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


def zero_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Problems of the ZeRO section and its fit with the backend and the unfreeze schedule."""
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
    if res.deepspeed_overrides and (not uses_deepspeed or zero is None):
        problems.append(
            ("resources.deepspeed_overrides", "only applies when DeepSpeed is used with resources.zero set")
        )
    if zero is None:
        return problems
    if zero.offload_optimizer == "cpu" and zero.stage == 0:
        problems.append(("resources.zero.offload_optimizer", "optimizer offload needs stage >= 1"))
    if zero.offload_params == "cpu" and zero.stage != 3:
        problems.append(("resources.zero.offload_params", "parameter offload needs stage 3"))
    if spec.model.unfreeze_schedule:
        problems.append(
            (
                "model.unfreeze_schedule",
                "gradual unfreezing is not supported under ZeRO (DeepSpeed partitions only the "
                "parameters trainable at start); use model.freeze, or drop resources.zero",
            )
        )
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
    if spec.train.early_stopping:
        problems += _early_stopping_metric_problems(spec)
        save, every = spec.train.save_steps, spec.eval.steps
        if save is not None and every is not None and save % every:
            problems.append(
                (
                    "train.save_steps",
                    f"{save} is not a multiple of eval.steps={every}: early stopping keeps the best "
                    "checkpoint, so checkpoints must fall on evaluations",
                )
            )
    if spec.eval.steps is not None and not has_validation:
        problems.append(
            ("eval.steps", "needs validation data (data.validation or data.validation_ratio > 0)")
        )
    return problems


#: Periodic evaluation's metrics a metric of ``min`` mode is better the lower it is.
LOWER_IS_BETTER = {"eval_loss", "eval_perplexity"}


def _early_stopping_metric_problems(spec: JobSpec) -> list[tuple[str, str]]:
    early = spec.train.early_stopping
    assert early is not None
    return metric_problems(spec, early.metric, early.mode, "train.early_stopping")


def metric_problems(spec: JobSpec, metric: str, mode: str, section: str) -> list[tuple[str, str]]:
    """``metric`` must be one periodic evaluation produces for this task, and ``mode`` the right way
    (``section.metric``, ``section.mode``: the keys a problem names)."""
    task_metrics = CLASSIFICATION_METRICS if spec.model.task == "sequence_classification" else {"perplexity"}
    produced = sorted({"eval_loss", *(f"eval_{m}" for m in task_metrics)})
    named = metric if metric.startswith("eval_") else f"eval_{metric}"
    if named not in produced:
        hint = difflib.get_close_matches(named, produced, 1)
        return [
            (
                f"{section}.metric",
                f"{metric!r} is not a metric that evaluation produces for model.task="
                f"{spec.model.task!r}; one of {produced}" + (f" (did you mean {hint[0]!r}?)" if hint else ""),
            )
        ]
    right = "min" if named in LOWER_IS_BETTER else "max"
    if mode != right:
        return [
            (
                f"{section}.mode",
                f"{named} is better when {'lower' if right == 'min' else 'higher'}: use mode: {right}",
            )
        ]
    return []


def tracking_problems(tracking: TrackingSpec, where: str = "tracking") -> list[tuple[str, str]]:
    """MLflow settings with no MLflow to report to; a tracker listed twice."""
    problems = [
        (f"{where}.{key}", f"{where}.{key} is set but {where}.report_to does not list mlflow")
        for key in ("mlflow_uri", "experiment")
        if getattr(tracking, key) is not None and "mlflow" not in tracking.report_to
    ]
    if len(set(tracking.report_to)) != len(tracking.report_to):
        problems.append(
            (f"{where}.report_to", f"{where}.report_to lists a tracker twice: {tracking.report_to}")
        )
    return problems


def _sweep_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """A sweep's metric must be evaluated; a scheduler that stops trials early needs evaluations
    during training, and Ray Tune to run it."""
    sweep = spec.sweep
    if sweep is None:
        return []
    problems = metric_problems(spec, sweep.metric, sweep.mode, "sweep")
    if not (spec.data.validation or spec.data.validation_ratio > 0):
        problems.append(
            ("sweep.metric", "needs validation data (data.validation or data.validation_ratio > 0)")
        )
    if sweep.scheduler != "none":
        if sweep.backend != "ray":
            problems.append(
                (
                    "sweep.scheduler",
                    f"{sweep.scheduler!r} stops trials early through Ray Tune: use sweep.backend: ray "
                    "(--backend ray), or scheduler: none",
                )
            )
        if spec.eval.steps is None:
            problems.append(
                ("sweep.scheduler", f"{sweep.scheduler!r} needs eval.steps (how often to report)")
            )
    return problems


def _slurm_problems(spec: JobSpec) -> list[tuple[str, str]]:
    slurm = spec.slurm
    if slurm is None:
        return []
    limit = slurm.time_limit_seconds(slurm.time)
    if limit is not None and slurm.signal_grace_seconds >= limit:
        return [
            (
                "slurm.signal_grace_seconds",
                f"{slurm.signal_grace_seconds} s is not shorter than slurm.time {slurm.time!r} ({limit} s): "
                f"the checkpoint signal would come before training; use less than {limit}",
            )
        ]
    return []


def _ray_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """The ray backend places ``resources.workers`` itself; ``ray.*`` must be a usable cluster setting."""
    res, ray = spec.resources, spec.ray
    problems: list[tuple[str, str]] = []
    if res.backend == "ray":
        layout = {
            "nodes": res.nodes > 1,
            "processes_per_node": res.processes_per_node,
            "gpus_per_node": res.gpus_per_node,
        }
        problems += [
            (
                f"resources.{key}",
                "does not apply to the ray backend, which places the workers itself: "
                "use resources.workers, cpus_per_worker and gpus_per_worker",
            )
            for key, set_ in layout.items()
            if set_
        ]
    if ray is None:
        return problems
    address = ray.address
    if address not in ("local", "auto") and not _is_ray_address(address):
        problems.append(
            (
                "ray.address",
                f"{address!r} is not a Ray address; use 'local' (a private Ray for this run), 'auto' (the "
                "cluster this machine belongs to), 'host:6379', 'ray://host:10001' or 'http://host:8265'",
            )
        )
    needed = (res.workers or 1) * res.cpus_per_worker
    if ray.num_cpus is not None and address != "local":
        problems.append(("ray.num_cpus", "only applies to ray.address: local (the private Ray's CPUs)"))
    elif ray.num_cpus is not None and ray.num_cpus < needed:
        problems.append(
            (
                "ray.num_cpus",
                f"{ray.num_cpus} CPUs cannot hold resources.workers × cpus_per_worker = "
                f"{res.workers or 1} × {res.cpus_per_worker} = {needed}",
            )
        )
    return problems + _runtime_env_problems(ray.runtime_env)


def _is_ray_address(address: str) -> bool:
    """``host:port``, ``ray://host:port`` or ``http(s)://host[:port]``."""
    try:
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        port = parts.port
    except ValueError:
        return False
    web = parts.scheme in ("http", "https")
    return (
        bool(parts.hostname) and parts.scheme in ("tcp", "ray", "http", "https") and (web or port is not None)
    )


def _runtime_env_problems(runtime_env: dict[str, object]) -> list[tuple[str, str]]:
    """Fields and types of ``ray.runtime_env`` as Ray checks them (skipped when Ray is not installed)."""
    if not runtime_env:
        return []
    try:
        from ray.runtime_env import RuntimeEnv
    except ImportError:
        return []
    allowed = sorted(k for k in RuntimeEnv.known_fields if not k.startswith("_"))
    unknown = [key for key in runtime_env if key not in RuntimeEnv.known_fields]
    if unknown:
        return [
            (
                f"ray.runtime_env.{key}",
                "not a runtime_env field"
                + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(key, allowed, 1))
                + f"; allowed: {', '.join(allowed)}",
            )
            for key in unknown
        ]
    try:
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as exc:
        return [("ray.runtime_env", str(exc).splitlines()[0])]
    return []
