"""``flotilla eval``: task metrics of a trained run or adapter on any dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from launcher.data import cache_root, prepare_data
from launcher.errors import FlotillaError
from launcher.model import load_model, load_tokenizer
from launcher.plan import reopen_run
from launcher.spec import DataSource, DataSpec, JobSpec
from launcher.train.generation_metrics import generation_metrics
from launcher.train.metrics import classification_metrics, is_task_metric, majority_baseline
from launcher.train.trainer import BatchCollator, FlotillaTrainer


def locate_run(target: Path) -> tuple[JobSpec, Path]:
    """The spec and the trained artifact (adapter/ or model/) of a run dir or an artifact inside one."""
    run_dir = target if (target / "plan.json").is_file() else target.parent
    if not (run_dir / "plan.json").is_file():
        raise FlotillaError(f"{target} is neither a run directory nor an adapter/model folder inside one")
    spec = reopen_run(run_dir).spec
    if target != run_dir:
        return spec, target
    artifact = run_dir / ("adapter" if spec.peft.method == "lora" else "model")
    if not artifact.is_dir():
        raise FlotillaError(f"{run_dir} has no trained {artifact.name}/ yet (did the run finish?)")
    return spec, artifact


def load_trained(spec: JobSpec, artifact: Path, labels: list[str] | None) -> Any:
    """The base model with the trained adapter applied, or the fully fine-tuned model."""
    if spec.peft.method == "lora":
        from peft import PeftModel

        base = load_model(spec.model, labels)
        return PeftModel.from_pretrained(base, str(artifact))
    full = spec.model.model_copy(update={"path": str(artifact), "gguf_file": None})
    return load_model(full, labels)


def evaluate_target(
    target: Path,
    data_path: str,
    data_format: str | None = None,
    batch_size: int = 8,
    generate_rows: int = 0,
) -> dict[str, Any]:
    """Metrics of ``target`` on ``data_path`` (same format as training unless given).

    With ``generate_rows`` > 0 a causal LM also generates answers for that many rows and reports
    ROUGE-L and BLEU against the references.
    """
    spec, artifact = locate_run(target)
    summary_file = artifact.parent / "summary.json"
    labels = json.loads(summary_file.read_text()).get("labels") if summary_file.is_file() else None
    tokenizer = load_tokenizer(spec.model)
    data_spec = DataSpec(
        train=[DataSource(path=data_path, format=data_format or spec.data.format, fields=spec.data.fields)],
        validation_ratio=0.0,
        dedup=False,
        max_length=spec.data.max_length,
        on_bad_rows=spec.data.on_bad_rows,
    )
    data = prepare_data(data_spec, tokenizer, spec.seed, cache_root(data_spec, artifact.parent), labels)
    model = load_trained(spec, artifact, data.labels)
    classifier = spec.model.task == "sequence_classification"
    trainer = FlotillaTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(artifact.parent / "eval-tmp"),
            per_device_eval_batch_size=batch_size,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            remove_unused_columns=False,
        ),
        data_collator=BatchCollator(tokenizer, spec.model.task, packing=False),
        processing_class=tokenizer,
        compute_metrics=classification_metrics if classifier else None,
        report_perplexity=not classifier,
    )
    metrics: dict[str, Any] = {
        k: float(v)
        for k, v in trainer.evaluate(data.train, metric_key_prefix="eval").items()
        if is_task_metric(k, v)
    }
    metrics["rows"] = len(data.train)
    if generate_rows and not classifier:
        scores = generation_metrics(
            model, tokenizer, data.train, spec.eval.generate_max_new_tokens, limit=generate_rows
        )
        metrics.update({f"eval_{k}": v for k, v in scores.items()})
    if classifier:
        metrics["majority_baseline_accuracy"] = majority_baseline(list(data.train["labels"]))
    return metrics
