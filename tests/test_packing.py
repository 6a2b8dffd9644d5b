"""Padding-free packing must change speed, not the loss: packed and padded batches agree, on the
model exactly as the train core builds it (its builder sets what packing depends on)."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.data.encode import encode_row
from launcher.model.load import load_tokenizer
from launcher.spec import JobSpec
from launcher.train.attention import PER_DOCUMENT
from launcher.train.core import build_model
from launcher.train.target_logits import select_target_positions, takes_logits_to_keep
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


ROWS = [
    {"prompt": "Add 2 and 3.", "response": "Answer: 5. Reason: 2 + 3 = 5."},
    {"prompt": "What is the capital of Peru? Answer in one word, please.", "response": "Answer: Lima."},
    {"prompt": "Plural of mouse?", "response": "Answer: mice. Reason: irregular plural."},
    {"prompt": "Name a prime number above ten, and say why it is one.", "response": "13: no divisor."},
]


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return loss.detach(), grads


def _trained_model(spec: JobSpec, tokenizer) -> torch.nn.Module:
    """The train core's model with its LoRA B moved off zero, so every gradient is non-trivial."""
    model, _ = build_model(spec, None, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model.train()  # dropout off below: the comparison is of the computation, not of random masks
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_per_document_attention_gives_the_padded_loss_and_gradients(tiny_llama: Path, tmp_path: Path) -> None:
    """Packing picks per-document attention (``model.attention: auto``): each document attends to
    itself only, and the loss and every LoRA gradient equal those of the same rows padded."""
    spec = JobSpec.model_validate(tiny_job(tiny_llama, tmp_path, data={"packing": True}))
    tokenizer = load_tokenizer(spec.model)
    model = _trained_model(spec, tokenizer)
    assert model.config._attn_implementation == PER_DOCUMENT
    features = [encode_row(row, tokenizer, max_length=128) for row in ROWS]
    padded = BatchCollator(tokenizer, "causal_lm", packing=False)(features)
    packed = BatchCollator(tokenizer, "causal_lm", packing=True)(features)
    padded_loss, padded_grads = _loss_and_grads(model, padded)
    packed_loss, packed_grads = _loss_and_grads(model, packed)
    assert torch.allclose(padded_loss, packed_loss, atol=1e-5), (padded_loss, packed_loss)
    for padded_grad, packed_grad in zip(padded_grads, packed_grads, strict=True):
        assert torch.allclose(padded_grad, packed_grad, atol=1e-5, rtol=1e-4)


def test_target_only_logits_give_the_same_loss_and_gradients(tiny_llama: Path, tmp_path: Path) -> None:
    """``train.target_only_logits``: the head runs on target positions only (fewer logits), and the
    loss and gradients are those of the full head, padded and packed."""
    for packing in (False, True):
        spec = JobSpec.model_validate(tiny_job(tiny_llama, tmp_path, data={"packing": packing}))
        tokenizer = load_tokenizer(spec.model)
        model = _trained_model(spec, tokenizer)
        assert takes_logits_to_keep(model)
        features = [encode_row(row, tokenizer, max_length=128) for row in ROWS]
        batch = BatchCollator(tokenizer, "causal_lm", packing=packing)(features)
        selected = select_target_positions(batch)
        targets = int((batch["labels"][..., 1:] != -100).sum())
        assert model(**selected).logits.shape[0] == targets < batch["input_ids"].numel()
        full_loss, full_grads = _loss_and_grads(model, batch)
        target_loss, target_grads = _loss_and_grads(model, selected)
        assert torch.allclose(full_loss, target_loss, atol=1e-6), (packing, full_loss, target_loss)
        for full_grad, target_grad in zip(full_grads, target_grads, strict=True):
            assert torch.allclose(full_grad, target_grad, atol=1e-6, rtol=1e-5)
