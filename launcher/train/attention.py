"""Per-document attention for packed (flattened) batches: the cost follows document boundaries.

A flattened batch is one row holding every document back to back. SDPA over it, even with the
block-diagonal mask transformers builds from the restarting ``position_ids``, computes the scores
of every pair of tokens in the row, O((Σ lengths)²), and discards the cross-document ones. Here each
document attends to itself only: Σ length² work, the same outputs. transformers' attention registry
(``AttentionInterface``) is the kept extension point; the kernel behind it is torch's: varlen flash
attention on CUDA in half precision, one causal SDPA call per document otherwise (CPU has no
varlen kernel in torch 2.13).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

#: The name the train core registers with transformers' attention and mask registries.
PER_DOCUMENT = "flotilla_per_document"


def document_bounds(kwargs: dict[str, Any]) -> list[int] | None:
    """Start offsets of the documents in the one packed row, with the row's end last, or ``None``.

    From the collator's ``cu_seq_lens_q`` (DataCollatorWithFlattening with flash-attention kwargs),
    else from ``position_ids`` restarting at 0.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None:
        return [int(b) for b in bounds.tolist()]
    positions = kwargs.get("position_ids")
    if positions is None or positions.shape[0] != 1:
        return None
    starts = torch.nonzero(positions[0] == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    return [*starts, positions.shape[1]]


def per_document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` [1, heads, tokens, dim] of a packed row, output
    [1, tokens, heads, dim]. A padded batch (a mask, or no document bounds) goes to plain SDPA."""
    bounds = document_bounds(kwargs) if attention_mask is None and query.shape[0] == 1 else None
    if bounds is None or len(bounds) <= 2:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return _varlen_flash(query, key, value, bounds, scaling), None
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split, not slicing: a slice's backward writes its gradient into a zero tensor of the whole row
    # (one full-row fill and add per document); split's backward is one concatenation
    lengths = [end - start for start, end in pairwise(bounds)]
    outputs = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling
        )
        for q, k, v in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2), strict=True
        )
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _varlen_flash(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], scaling: float | None
) -> torch.Tensor:
    """torch's varlen flash attention over the packed row (causal: window (-1, 0))."""
    from torch.nn.attention.varlen import varlen_attn

    cumulative = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(end - start for start, end in pairwise(bounds))
    output = varlen_attn(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cumulative,
        cumulative,
        longest,
        longest,
        scale=scaling,
        window_size=(-1, 0),
        enable_gqa=True,
    )
    return output.unsqueeze(0)


def _per_document_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """No mask for a packed row (the documents are the mask); SDPA's mask for a padded batch."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_per_document_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` (and its sub-models) to per-document attention."""
    AttentionInterface.register(PER_DOCUMENT, per_document_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PER_DOCUMENT, _per_document_mask)
    model.set_attn_implementation(PER_DOCUMENT)
