"""Models and tokenizers from a directory, hub id, GGUF file or bundled alias; LoRA; freezing.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.model.load import (
    apply_peft,
    count_parameters,
    enable_gradient_checkpointing,
    freeze_parameters,
    load_model,
    load_tokenizer,
    loadable_source,
    matching_parameters,
)
from launcher.model.source import model_sha256

__all__ = [
    "apply_peft",
    "count_parameters",
    "enable_gradient_checkpointing",
    "freeze_parameters",
    "load_model",
    "load_tokenizer",
    "loadable_source",
    "matching_parameters",
    "model_sha256",
]
