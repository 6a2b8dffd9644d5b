"""Tiny random models for fast tests: real tokenizers, Llama-shaped weights built from a config."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.model.load import load_tokenizer
from launcher.spec.models import ModelSpec


def build_tiny_llama(folder: Path) -> Path:
    """Save a 2-layer, hidden-64 Llama with SmolLM2's tokenizer into ``folder``."""
    tokenizer = load_tokenizer(ModelSpec(path="smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
