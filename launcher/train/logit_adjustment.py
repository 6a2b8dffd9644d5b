"""Logit-adjusted training for label imbalance (Menon et al. 2021; FedLC, Zhang et al. 2022).

Training adds ``tau * log(prior)`` of each label, the training rows' label frequencies, to the
classifier's logits, so the loss stops rewarding a model for predicting the frequent labels; evaluation
and the saved model use the plain logits, which then estimate the balanced posterior. Under a
federation each site adjusts by its own label mix, which removes most of what label skew does to its
update. Written here because neither transformers nor peft has it: it is a forward hook on the head.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

#: Names transformers gives the classification head of its ``*ForSequenceClassification`` models.
HEAD_NAMES = ("classifier", "score")


def label_log_prior(label_ids: Iterable[int], classes: int) -> torch.Tensor:
    """log of each label's share of the rows, add-one smoothed (a label a site lacks stays finite)."""
    counts = np.bincount(np.fromiter(label_ids, dtype=np.int64), minlength=classes)[:classes]
    return torch.log(torch.as_tensor((counts + 1) / (counts.sum() + classes), dtype=torch.float32))


def classification_head(model: torch.nn.Module) -> torch.nn.Module:
    """The outermost module named like a transformers classification head (a PEFT wrapper included)."""
    heads = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] in HEAD_NAMES]
    if not heads:
        raise ValueError(f"no classification head ({' or '.join(HEAD_NAMES)}) in {type(model).__name__}")
    return min(heads, key=lambda pair: pair[0].count("."))[1]


def adjust_logits_in_training(model: torch.nn.Module, offsets: torch.Tensor) -> RemovableHandle:
    """Add ``offsets`` to the head's logits whenever the head is in training mode."""

    def hook(module: torch.nn.Module, _inputs: object, logits: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return logits
        return logits + offsets.to(device=logits.device, dtype=logits.dtype)

    return classification_head(model).register_forward_hook(hook)
