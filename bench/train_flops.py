"""Model FLOPs of a training step, and the matmul peak they are divided by.

Per token, for the model's body (every linear layer but the LM head; the embedding lookup is no
matmul) of N parameters: forward 2N, backward 2N for the activation gradients, plus 2N of weight
gradients in a full fine-tune; with LoRA, its N_lora parameters add 6·N_lora (forward, input and
weight gradients).
The LM head (H parameters) counts only at positions whose next token is a target, the ones the
loss needs: 2H forward and 2H backward there, plus 2H of weight gradient when it trains.
Attention adds, per layer and document of length l, 2·l²·d for the causal QKᵀ and PV forward
(half of 4·l²·d), twice that backward, with d = heads × head_dim. These are the FLOPs the job
needs: padding, cross-document attention in a flattened row and prompt positions' logits are not
counted, so a side that computes them spends FLOPs the efficiency does not credit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a model."""

    body_parameters: int  # the linear layers but the head, without LoRA
    head_parameters: int
    lora_parameters: int
    layers: int
    attention_width: int

    @classmethod
    def of(cls, model_dir: str, lora_rank: int = 8) -> ModelShape:
        """The shape of the causal LM in ``model_dir`` with a rank-``lora_rank`` LoRA on all linear layers."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        # peft's all-linear leaves the output head out
        body = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        lora = sum(lora_rank * (m.in_features + m.out_features) for m in body)
        width = config.num_attention_heads * getattr(
            config, "head_dim", config.hidden_size // config.num_attention_heads
        )
        base = sum(m.in_features * m.out_features for m in body)
        return cls(base, head.in_features * head.out_features, lora, config.num_hidden_layers, width)


def step_flops(shape: ModelShape, lengths: list[int], targets: list[int], full: bool) -> float:
    """Model FLOPs of one training step over documents of ``lengths`` tokens, ``targets`` of whose
    positions predict a token of the loss."""
    # full: forward, input and weight gradients of the body; LoRA: forward and input gradients of
    # the frozen body, all three of the LoRA matrices
    body = 6 * shape.body_parameters if full else 4 * shape.body_parameters + 6 * shape.lora_parameters
    head = (6 if full else 4) * shape.head_parameters
    attention_forward = sum(2 * length * length * shape.attention_width for length in lengths) * shape.layers
    return body * sum(lengths) + head * sum(targets) + 3 * attention_forward


def matmul_peak_flops(threads: int, size: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """FLOP/s of a large float32 matmul with ``threads`` torch threads (best of ``repeats``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "size": size, "flops_per_second": 2 * size**3 / best}
