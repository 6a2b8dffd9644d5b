"""The train core: one function that every backend runs in every process.

It reads the plan from the run directory and the rank/world from the environment the backend set;
it never knows which backend started it.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from launcher.atomic import write_json_atomic
from launcher.data import PreparedData, cache_root, prepare_data
from launcher.errors import SpecError
from launcher.model import (
    apply_peft,
    count_parameters,
    enable_gradient_checkpointing,
    freeze_parameters,
    load_model,
    load_tokenizer,
    matching_parameters,
)
from launcher.plan import Plan
from launcher.report import write_report
from launcher.rundir import STOP_REQUEST, write_manifest
from launcher.spec import JobSpec
from launcher.train.attention import use_per_document_attention
from launcher.train.callbacks import CheckpointOnSignal, GradualUnfreeze, MetricsJsonl
from launcher.train.checkpoint import latest_verified_checkpoint, save_verified
from launcher.train.cross_entropy import use_chunked_loss
from launcher.train.generation_metrics import generation_metrics
from launcher.train.library_output import hide_library_progress_bars, show_library_warnings_once
from launcher.train.logit_adjustment import adjust_logits_in_training, label_log_prior
from launcher.train.metrics import classification_metrics, is_task_metric
from launcher.train.preflight import preflight
from launcher.train.progress import RichProgress
from launcher.train.target_logits import takes_logits_to_keep
from launcher.train.tracking import TrackerCallback, Trackers, open_trackers
from launcher.train.trainer import BatchCollator, FlotillaTrainer, LossTerm
from launcher.train.watchdog import HangWatchdog
from launcher.train.zero import EvaluateAtTrainBegin, consolidated_state_dict, gathered, is_zero3


@dataclass
class TrainOutcome:
    """What a finished (or interrupted) run produced."""

    run_dir: Path
    interrupted: bool
    steps: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    artifact: Path | None = None


def process_rank() -> tuple[int, int, int]:
    """(global rank, local rank, world size) from the environment a backend set."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )


def run_training(
    run_dir: Path,
    console: Console | None = None,
    extra_callbacks: list[TrainerCallback] | None = None,
    loss_terms: list[LossTerm] | None = None,
) -> TrainOutcome:
    """Train the job planned in ``run_dir``, resuming from its last verified checkpoint if any.

    ``extra_callbacks`` let a backend observe training (Ray Train reports checkpoints through one);
    ``loss_terms`` are added to the training loss (a federated site's FedProx term).
    """
    started = time.time()
    plan = Plan.load(run_dir / "plan.json")
    spec = plan.job_spec()
    rank, _, world = process_rank()
    console = console or Console(stderr=True)
    show_library_warnings_once()
    hide_library_progress_bars()
    say = functools.partial(console.print, soft_wrap=True) if rank == 0 else (lambda *a, **k: None)
    if world > 1:
        say(preflight(plan.device, plan.processes_per_node))

    set_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model)
    output_dir = run_dir.resolve().parent.parent  # run dirs are <output.dir>/<name>/<timestamp>
    data = prepare_data(spec.data, tokenizer, spec.seed, cache_root(spec.data, output_dir), console=say)
    if rank == 0:
        _write_data_report(run_dir, data, say)
        write_manifest(run_dir, spec.seed, data.fingerprints, {"world_size": plan.world_size})
    model, unfreeze = build_model(spec, data.labels, tokenizer)
    if spec.train.logit_adjustment and data.labels:
        prior = label_log_prior(data.train["labels"], len(data.labels))
        adjust_logits_in_training(model, spec.train.logit_adjustment * prior)
    trainable, total = count_parameters(model)
    say(f"model: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    signal_callback = CheckpointOnSignal(run_dir / STOP_REQUEST)
    trainer = build_trainer(spec, plan, run_dir, model, tokenizer, data, unfreeze, signal_callback, console)
    for callback in extra_callbacks or []:
        trainer.add_callback(callback)
    trainer.loss_terms = list(loss_terms or [])
    checkpoint = latest_verified_checkpoint(
        run_dir / "checkpoints", trainer.args.process_index, trainer.args.world_size, trainer.gather
    )
    trackers = _open_trackers(spec, run_dir, checkpoint) if trainer.is_world_process_zero() else Trackers([])
    trainer.add_callback(TrackerCallback(trackers))
    with trackers:
        outcome = _train(trainer, spec, data, run_dir, rank, world, checkpoint, signal_callback, say)
    if outcome.interrupted:
        trackers.abort("KILLED")  # continued, as the same tracker run, by the resume
        return outcome
    if rank == 0:
        write_json_atomic(
            run_dir / "summary.json",
            {
                "steps": outcome.steps,
                "wall_seconds": time.time() - started,
                "before": outcome.before,
                "after": outcome.after,
                "artifact": str(outcome.artifact),
                "best_checkpoint": trainer.state.best_model_checkpoint if spec.train.early_stopping else None,
                "labels": data.labels,
            },
        )
        write_report(run_dir)
    artifacts = [run_dir / name for name in ("spec.yaml", "data_report.json", "summary.json", "report.html")]
    trackers.finish(artifacts + ([run_dir / "adapter"] if spec.peft.method == "lora" else []))
    return outcome


def _train(
    trainer: FlotillaTrainer,
    spec: JobSpec,
    data: PreparedData,
    run_dir: Path,
    rank: int,
    world: int,
    checkpoint: Path | None,
    signal_callback: CheckpointOnSignal,
    say: Any,
) -> TrainOutcome:
    """Metrics before, training (resumed from ``checkpoint``), metrics after, the verified artefact."""
    resuming = checkpoint is not None
    early = EvaluateAtTrainBegin(lambda: _before_metrics(trainer, data, spec, run_dir, rank, resuming))
    watchdog = HangWatchdog(run_dir, rank, world, spec.resources.hang_timeout)
    trainer.add_callback(watchdog)
    with signal_callback.installed(), watchdog:
        if trainer.is_deepspeed_enabled:  # DeepSpeed can evaluate only once its engine exists
            trainer.add_callback(early)
        else:
            early.result = early.evaluate()
        if checkpoint is not None:
            say(f"resuming from {checkpoint}")
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        before = early.result or {}
        if signal_callback.stopped:
            say(f"stopped on signal {signal_callback.received}: checkpoint saved, exit for requeue")
            return TrainOutcome(run_dir, True, trainer.state.global_step, before)
        after = evaluate_all(trainer, data, spec)
        artifact = save_artifact(trainer, spec, run_dir, trainer.processing_class)
    return TrainOutcome(run_dir, False, trainer.state.global_step, before, after, artifact)


def _open_trackers(spec: JobSpec, run_dir: Path, checkpoint: Path | None) -> Trackers:
    """The job's trackers, continuing its tracker run when resuming from ``checkpoint``."""
    resume_step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else None
    params = spec.model_dump(mode="json", exclude={"tracking"})
    return open_trackers(spec.tracking, run_dir, params, spec.name, resume_step)


def build_model(
    spec: JobSpec, labels: list[str] | None, tokenizer: Any
) -> tuple[PreTrainedModel, GradualUnfreeze | None]:
    """Base model, then freezing, LoRA and gradient checkpointing as the spec asks."""
    model = load_model(spec.model, labels, tokenizer)
    # Training needs no KV cache; without one, packed rows get a block-diagonal attention mask.
    model.config.use_cache = False
    choose_attention(model, spec)
    use_chunked_loss(model)
    freeze_parameters(model, spec.model.freeze)
    model = apply_peft(model, spec.peft, spec.model.task)
    if spec.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    unfreeze = None
    if spec.model.unfreeze_schedule:
        stages = [(s, matching_parameters(model, s.patterns)) for s in spec.model.unfreeze_schedule]
        for stage, params in stages:
            for param in params:
                param.requires_grad_(True)
            if not params:
                raise SpecError(
                    "model.unfreeze_schedule",
                    [
                        f"model.unfreeze_schedule (step {stage.step}): no parameter name matches {stage.patterns}"
                    ],
                )
        unfreeze = GradualUnfreeze(stages)
    return model, unfreeze


def choose_attention(model: PreTrainedModel, spec: JobSpec) -> None:
    """The attention kernel ``model.attention`` names (``auto``: per-document for packed causal LMs)."""
    attention = spec.model.attention
    if attention == "auto":
        packed = spec.data.packing and spec.model.task == "causal_lm"
        attention = "per_document" if packed else None
    if attention == "per_document":
        use_per_document_attention(model)
    elif attention is not None:
        model.set_attn_implementation(attention)


def training_arguments(spec: JobSpec, plan: Plan, run_dir: Path) -> TrainingArguments:
    """The Trainer's arguments, derived from the spec and plan (DeepSpeed config included)."""
    train, evaluation = spec.train, spec.eval
    save_steps = train.save_steps or evaluation.steps or 10**9
    early = train.early_stopping
    on_cpu = plan.device == "cpu"
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=plan.micro_batch_size,
        per_device_eval_batch_size=evaluation.batch_size or plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_steps if train.warmup_steps is not None else train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if evaluation.steps else "no",
        eval_steps=evaluation.steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None,
        seed=spec.seed,
        data_seed=spec.seed,
        # TensorBoard and MLflow are Flotilla's own trackers (launcher.train.tracking); wandb is transformers'
        report_to=[name for name in spec.tracking.report_to if name == "wandb"] or "none",
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and plan.world_size > 1 else None,
        deepspeed=plan.deepspeed_config,
        remove_unused_columns=False,
        train_sampling_strategy=_sampling_strategy(spec),
        length_column_name="length",
        metric_for_best_model=early.metric if early else None,
        greater_is_better=(early.mode == "max") if early else None,
        # early stopping keeps the best checkpoint by its metric, not the last one
        load_best_model_at_end=early is not None,
        disable_tqdm=True,
        dataloader_num_workers=0,
        optim=train.optimizer,
        include_num_input_tokens_seen="non_padding",
    )


def _sampling_strategy(spec: JobSpec) -> str:
    """The Trainer's sampler: length-grouped, file order or random."""
    if spec.data.group_by_length:
        return "group_by_length"
    return "random" if spec.data.shuffle else "sequential"


def build_trainer(
    spec: JobSpec,
    plan: Plan,
    run_dir: Path,
    model: PreTrainedModel,
    tokenizer: Any,
    data: PreparedData,
    unfreeze: GradualUnfreeze | None,
    signal_callback: CheckpointOnSignal,
    console: Console,
) -> FlotillaTrainer:
    """A :class:`FlotillaTrainer` with Flotilla's callbacks."""
    classifier = spec.model.task == "sequence_classification"
    callbacks: list[Any] = [MetricsJsonl(run_dir / "metrics.jsonl"), signal_callback]
    if not console.quiet:
        callbacks.append(RichProgress(console))
    if unfreeze:
        callbacks.append(unfreeze)
    if spec.train.early_stopping:
        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=spec.train.early_stopping.patience,
                early_stopping_threshold=spec.train.early_stopping.threshold,
            )
        )
    trainer = FlotillaTrainer(
        model=model,
        args=training_arguments(spec, plan, run_dir),
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=BatchCollator(tokenizer, spec.model.task, spec.data.packing),
        processing_class=tokenizer,
        compute_metrics=classification_metrics if classifier else None,
        callbacks=callbacks,
        keep_checkpoints=spec.train.save_total_limit,
        report_perplexity=not classifier,
        target_only_logits=spec.train.target_only_logits and not classifier and takes_logits_to_keep(model),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout: RichProgress shows them
    return trainer


def evaluate_all(trainer: FlotillaTrainer, data: PreparedData, spec: JobSpec) -> dict[str, float]:
    """Validation metrics plus loss on a fixed probe of training rows (collective: every rank).

    ROUGE-L and BLEU (``eval.metrics``) need generation and are computed in single-process runs.
    """
    metrics: dict[str, float] = {}
    if data.validation is not None:
        metrics.update(trainer.evaluate(data.validation, metric_key_prefix="eval"))
        if {"rouge", "bleu"} & set(spec.eval.metrics) and trainer.args.world_size == 1:
            scores = generation_metrics(
                trainer.model, trainer.processing_class, data.validation, spec.eval.generate_max_new_tokens
            )
            metrics.update({f"eval_{k}": v for k, v in scores.items()})
    # Early stopping judges validation metrics only: shown train_* metrics it would warn that its
    # eval_* metric is missing and that early stopping is disabled (it is not).
    stopping = trainer.pop_callback(EarlyStoppingCallback)
    try:
        metrics.update(trainer.evaluate(data.train_probe, metric_key_prefix="train"))
    finally:
        if stopping is not None:
            trainer.add_callback(stopping)
    return {k: float(v) for k, v in metrics.items() if is_task_metric(k, v)}


def _before_metrics(
    trainer: FlotillaTrainer, data: PreparedData, spec: JobSpec, run_dir: Path, rank: int, resuming: bool
) -> dict[str, float]:
    """Metrics of the untrained model, computed once per run and kept for resumes."""
    path = run_dir / "eval_before.json"
    if resuming and path.is_file():
        return json.loads(path.read_text())
    if not spec.eval.at_start:
        return {}
    before = evaluate_all(trainer, data, spec)
    if trainer.args.world_size > 1 and not trainer.is_deepspeed_enabled:
        # evaluate() marked the model as prepared (for evaluation: no DDP); unmark it, or train()
        # would not wrap it in DDP and every rank would train alone, without gradient all-reduce.
        trainer.model._is_accelerate_prepared = False
    if rank == 0:
        write_json_atomic(path, before)
    return before


def save_artifact(trainer: FlotillaTrainer, spec: JobSpec, run_dir: Path, tokenizer: Any) -> Path:
    """Save the adapter (LoRA) or the full model, verified by reloading and comparing tensors.

    Under ZeRO-3 the partitioned weights are first gathered from every rank (a collective), so a
    partitioned tensor can never be saved empty (peft#2892, DeepSpeed#7900); rank 0 writes, between
    barriers."""
    model = trainer.model
    zero3 = is_zero3(trainer)
    trainer._barrier()
    if spec.peft.method == "lora":
        from peft import get_peft_model_state_dict

        target, weights = run_dir / "adapter", "adapter_model.safetensors"
        with gathered([p for p in model.parameters() if p.requires_grad], zero3):
            if trainer.args.should_save:
                expected = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
                labels = spec.model.task == "sequence_classification"
                save_verified(_saver(model, tokenizer, labels=labels), expected, weights, target)
    else:
        target, weights = run_dir / "model", "model.safetensors"
        state = consolidated_state_dict(trainer) if zero3 else None
        if trainer.args.should_save:
            expected = _untied_state(state if state is not None else model.state_dict())
            save_verified(_saver(model, tokenizer, state), expected, weights, target)
    trainer._barrier()
    return target


def _saver(
    model: PreTrainedModel, tokenizer: Any, state: dict[str, torch.Tensor] | None = None, labels: bool = False
) -> Any:
    """Save the model and tokenizer; with ``labels``, the label names beside them (labels.json): an
    adapter folder has no config.json to hold a classifier's id2label."""

    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(folder)
        if labels:
            write_labels(folder, model.config.id2label)

    return save


def write_labels(folder: Path, id2label: dict[int, str]) -> None:
    """``labels.json``: the label names in index order, and both mappings as transformers spells them."""
    names = [id2label[i] for i in sorted(id2label)]
    payload = {
        "labels": names,
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    (folder / "labels.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _untied_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with tied duplicates dropped (``save_pretrained`` writes one of each)."""
    seen: set[int] = set()
    untied = {}
    for key, tensor in state.items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        untied[key] = tensor.detach().cpu().clone()
    return untied


def _write_data_report(run_dir: Path, data: PreparedData, say: Any) -> None:
    write_json_atomic(run_dir / "data_report.json", data.report.to_dict())
    for line in data.report.summary_lines():
        say(f"data: {line}")
    for warning in data.report.warnings():
        say(f"[yellow]data warning:[/] {warning}")
