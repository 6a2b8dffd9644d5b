"""Padding-free packing must change speed, not the loss: packed and padded batches agree."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.data.encode import encode_row
from launcher.train.trainer import BatchCollator


def test_packed_batch_loss_equals_padded_batch_loss(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    model.config.use_cache = False  # as the train core sets it: packed rows are detected only without a cache
    rows = [
        {"prompt": "Add 2 and 3.", "response": "Answer: 5. Reason: 2 + 3 = 5."},
        {"prompt": "What is the capital of Peru? Answer in one word, please.", "response": "Answer: Lima."},
        {"prompt": "Plural of mouse?", "response": "Answer: mice. Reason: irregular plural."},
    ]
    features = [encode_row(row, tokenizer, max_length=128) for row in rows]
    padded = BatchCollator(tokenizer, "causal_lm", packing=False)(features)
    packed = BatchCollator(tokenizer, "causal_lm", packing=True)(features)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] < padded["input_ids"].numel()
    with torch.no_grad():
        padded_loss = model(**padded).loss
        packed_loss = model(**packed).loss
    assert torch.allclose(padded_loss, packed_loss, atol=1e-5), (padded_loss, packed_loss)
