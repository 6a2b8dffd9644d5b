"""Random models for fast tests and benchmarks: SmolLM2's real tokenizer, Llama-shaped weights from a config."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.model import load_tokenizer
from launcher.spec import ModelSpec

#: (hidden, intermediate, layers, attention heads, key/value heads) of the tests' tiny Llama.
TINY = (64, 128, 2, 4, 2)


def build_random_llama(
    folder: Path, shape: tuple[int, int, int, int, int], max_positions: int = 512, seed: int = 0
) -> int:
    """Save a randomly initialised Llama of ``shape`` with SmolLM2's tokenizer into ``folder``;
    its parameter count (tied embeddings counted once)."""
    tokenizer = load_tokenizer(ModelSpec(path="smollm2-135m-instruct"))
    hidden, intermediate, layers, heads, kv_heads = shape
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_tiny_llama(folder: Path) -> Path:
    """Save a 2-layer, hidden-64 Llama with SmolLM2's tokenizer into ``folder``."""
    build_random_llama(folder, TINY)
    return folder
