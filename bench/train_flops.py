"""Model FLOPs of a training step, and the matmul peak they are divided by.

Per token, for the model's matmul parameters N (every linear layer and the LM head; the embedding
lookup is no matmul): forward 2N, backward 2N for the activation gradients, plus the weight
gradients of what trains: 2·N_trainable for LoRA (the LoRA matrices, whose forward is also counted
in N), 2N for a full fine-tune. Attention adds, per layer and document of length l, 2·l²·d for the
causal QKᵀ and PV forward (half of 4·l²·d), twice that backward, with d = heads × head_dim. These
are the FLOPs the job needs: padding, cross-document attention of a flattened row and prompt
positions' logits are not counted, so a side that skips them does not look less efficient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a model."""

    matmul_parameters: int
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
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        matmul = sum(m.in_features * m.out_features for m in linears)
        # peft's all-linear leaves the output head out
        body = [m for m in linears if m is not model.get_output_embeddings()]
        lora = sum(lora_rank * (m.in_features + m.out_features) for m in body)
        width = config.num_attention_heads * getattr(
            config, "head_dim", config.hidden_size // config.num_attention_heads
        )
        return cls(matmul + lora, lora, config.num_hidden_layers, width)


def step_flops(shape: ModelShape, lengths: list[int], full: bool) -> float:
    """Model FLOPs of one training step over documents of ``lengths`` tokens."""
    tokens = sum(lengths)
    trainable = shape.matmul_parameters if full else shape.lora_parameters
    dense = (4 * shape.matmul_parameters + 2 * trainable) * tokens
    attention_forward = sum(2 * length * length * shape.attention_width for length in lengths) * shape.layers
    return dense + 3 * attention_forward


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
