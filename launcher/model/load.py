"""Model and tokenizer loading, LoRA through peft, freezing and gradient checkpointing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from launcher.atomic import publish_dir, staging_dir
from launcher.errors import FlotillaError
from launcher.model.dropout import use_fast_lora_dropout
from launcher.model.source import ModelSource, gguf_cache_dir, hub_hint, resolve_model_source
from launcher.spec import ModelSpec, PeftSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loadable_source(spec: ModelSpec) -> ModelSource:
    """The source to load, with GGUF models replaced by their cached safetensors copy."""
    source = resolve_model_source(spec.path, spec.gguf_file)
    if not source.gguf_file:
        return source
    cached = gguf_cache_dir(source)
    if not (cached / "config.json").is_file():
        _convert_gguf(source, cached)
    return ModelSource(str(cached))


def _convert_gguf(source: ModelSource, cached: Path) -> None:
    """De-quantize a GGUF model once and publish a safetensors copy at ``cached``."""
    staging = staging_dir(cached)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file}
    AutoTokenizer.from_pretrained(source.name_or_path, **kwargs).save_pretrained(staging)
    model = AutoModelForCausalLM.from_pretrained(source.name_or_path, dtype=torch.float32, **kwargs)
    # The weights are already de-quantized to float32; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    publish_dir(staging, cached)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of the model, with a pad token."""
    source = loadable_source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.name_or_path, trust_remote_code=spec.trust_remote_code, revision=spec.revision
        )
    except OSError as exc:
        raise FlotillaError(f"cannot load the tokenizer: {exc}\n{hub_hint(source)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(
    spec: ModelSpec, labels: list[str] | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """The base model for ``spec.task`` (a fresh head with ``labels`` for classification)."""
    source = loadable_source(spec)
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.trust_remote_code,
        "revision": spec.revision,
        "dtype": DTYPES.get(spec.dtype, "auto"),
    }
    try:
        if spec.task == "sequence_classification":
            names = labels or [str(i) for i in range(spec.num_labels or 2)]
            model = AutoModelForSequenceClassification.from_pretrained(
                source.name_or_path,
                num_labels=len(names),
                id2label=dict(enumerate(names)),
                label2id={name: i for i, name in enumerate(names)},
                **kwargs,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    except OSError as exc:
        raise FlotillaError(f"cannot load the model: {exc}\n{hub_hint(source)}") from None
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def apply_peft(model: PreTrainedModel, peft_spec: PeftSpec, task: str) -> PreTrainedModel:
    """Wrap ``model`` with LoRA adapters (no-op for a full fine-tune)."""
    if peft_spec.method == "none":
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=peft_spec.r,
        lora_alpha=peft_spec.alpha,
        lora_dropout=peft_spec.dropout,
        target_modules=peft_spec.target_modules,
        modules_to_save=peft_spec.modules_to_save or None,
        task_type=TaskType.SEQ_CLS if task == "sequence_classification" else TaskType.CAUSAL_LM,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise FlotillaError(f"peft.target_modules: {exc}") from None
    use_fast_lora_dropout(wrapped)
    if peft_spec.init_from:
        load_adapter_weights(wrapped, Path(peft_spec.init_from))
    if peft_spec.freeze_lora_a:
        for name, param in wrapped.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return wrapped


def load_adapter_weights(model: torch.nn.Module, folder: Path) -> None:
    """Start from the adapter saved in ``folder``; every saved tensor must fit the model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FlotillaError(f"peft.init_from: {weights} does not exist")
    try:
        result = set_peft_model_state_dict(model, load_file(str(weights)))
    except RuntimeError as exc:  # torch's size mismatch: an adapter of another rank or model
        raise FlotillaError(
            f"peft.init_from: {weights} does not fit this model and peft settings: {exc}"
        ) from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise FlotillaError(
            f"peft.init_from: {len(unexpected)} tensors do not fit the model, e.g. {unexpected[0]}"
        )


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> int:
    """Freeze parameters whose names match any regex in ``patterns``; return how many matched."""
    if not patterns:
        return 0
    compiled = [re.compile(p) for p in patterns]
    count = 0
    for name, param in model.named_parameters():
        if any(p.search(name) for p in compiled):
            param.requires_grad_(False)
            count += 1
    if count == 0:
        raise FlotillaError(f"model.freeze: no parameter name matches any of {patterns}")
    return count


def matching_parameters(model: torch.nn.Module, patterns: list[str]) -> list[torch.nn.Parameter]:
    """Parameters whose names match any regex in ``patterns``."""
    compiled = [re.compile(p) for p in patterns]
    return [p for name, p in model.named_parameters() if any(c.search(name) for c in compiled)]


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass (works with frozen inputs under LoRA)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
