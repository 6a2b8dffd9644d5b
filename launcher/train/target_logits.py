"""Logits and cross-entropy only where a token is predicted for the loss.

A causal LM's head (hidden × vocabulary: SmolLM2's 49k-word head is ~20% of its forward FLOPs) and
the cross-entropy normally run at every position, then prompt and padding positions are masked out
of the loss. transformers' ``logits_to_keep`` (a boolean mask selects positions before the head) and
the loss's ``shift_labels`` (the already-shifted targets of those positions) let the model skip
them; the loss, summed over the same targets and divided by the same count, is unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model (under a peft wrapper, if any) selects positions with ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def select_target_positions(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with the head and loss restricted to positions whose next token is a target."""
    labels = inputs["labels"]
    shifted = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}
