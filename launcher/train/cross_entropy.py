"""Causal-LM cross-entropy with its gradient computed beside the loss, a few rows at a time, on CPU.

torch's ``cross_entropy`` over ``[targets, vocabulary]`` logits passes over a tensor far larger than
the cache (SmolLM2: 1,247 targets x 49,152 words = 245 MB) about six times: ``log_softmax`` writes
it, the backward allocates and zero-fills a gradient of the same size, scatters into it, and reads
both again. Here the forward takes each chunk of rows while it is in cache and computes its
log-sum-exp, its loss and its gradient (softmax minus one-hot) in one visit; the backward only
scales the saved gradient (forward and backward over those logits on one thread: torch 394 ms,
this 205 ms). The loss and gradient are torch's to float rounding, and the saved gradient takes
the memory torch's saved ``log_softmax`` output took. Only for training on CPU: on accelerators, and without a backward
pass, torch's fused kernel is used. No kept library offers a chunked loss for CPU training
(Liger's fused kernels are Triton, GPU only), hence this module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss, fixed_cross_entropy

#: Bytes of logits handled per chunk: rows of a 49k vocabulary fit in a core's share of cache.
_CHUNK_BYTES = 2 << 20


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Σ over rows whose target is not ``ignore_index`` of ``logsumexp(x) - x[target]``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float64)
        rows = max(1, _CHUNK_BYTES // (logits.shape[1] * logits.element_size()))
        for start in range(0, logits.shape[0], rows):
            x, g, t = logits[start : start + rows], grad[start : start + rows], target[start : start + rows]
            valid = t != ignore_index
            safe = torch.where(valid, t, 0)[:, None]
            peak = x.amax(dim=1, keepdim=True)
            torch.sub(x, peak, out=g).exp_()
            norm = g.sum(dim=1, keepdim=True)
            g.div_(norm)  # softmax
            row_loss = peak[:, 0] + norm[:, 0].log() - x.gather(1, safe)[:, 0]
            total += torch.where(valid, row_loss, 0.0).sum(dtype=torch.float64)
            g.scatter_add_(1, safe, -valid[:, None].to(g.dtype))  # minus one-hot
            if not bool(valid.all()):
                g[~valid] = 0.0
        ctx.save_for_backward(grad)
        return total.to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(upstream), None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """transformers' ``fixed_cross_entropy`` (the summed loss over ``num_items_in_batch``, else the
    mean over targets), chunked when it will be differentiated on CPU."""
    if logits.device.type != "cpu" or not (torch.is_grad_enabled() and logits.requires_grad):
        return fixed_cross_entropy(logits, target, num_items_in_batch, ignore_index)
    total = _ChunkedCrossEntropySum.apply(logits, target, ignore_index)
    if num_items_in_batch is None:
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (labels shifted unless ``shift_labels`` is given) on
    :func:`cross_entropy`."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits.float().view(-1, vocab_size), target, num_items_in_batch, ignore_index)


def use_chunked_loss(model: torch.nn.Module) -> None:
    """Give ``model`` (or the model under its peft wrapper) :func:`causal_lm_loss` when its loss is
    transformers' causal-LM one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, PreTrainedModel) and base.loss_function is ForCausalLMLoss:
        base.loss_function = causal_lm_loss
