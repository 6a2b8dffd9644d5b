"""Padding-free packing must change speed, not the loss: packed and padded batches agree, on the
model exactly as the train core builds it (its builder sets what packing depends on)."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.data.encode import encode_row
from launcher.model.load import load_tokenizer
from launcher.spec import JobSpec
from launcher.train.core import build_model
from launcher.train.trainer import BatchCollator
from tests.conftest import tiny_job


def test_packed_batch_loss_equals_padded_batch_loss(tiny_llama: Path, tmp_path: Path) -> None:
    spec = JobSpec.model_validate(tiny_job(tiny_llama, tmp_path, data={"packing": True}))
    tokenizer = load_tokenizer(spec.model)
    model, _ = build_model(spec, None, tokenizer)
    model.eval()
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
