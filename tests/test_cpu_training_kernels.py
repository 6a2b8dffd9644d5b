"""The CPU training kernels change speed, not the computation: the chunked cross-entropy gives
torch's loss and gradients, and the LoRA dropout drops each element with probability p, independently,
scaling the rest as torch's dropout does; both on the model exactly as the train core builds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from launcher.data.encode import encode_row
from launcher.model.dropout import CpuFastDropout, drop_mask
from launcher.model.load import load_tokenizer
from launcher.spec import JobSpec
from launcher.train import cross_entropy
from launcher.train.core import build_model
from launcher.train.target_logits import select_target_positions
from launcher.train.trainer import BatchCollator
from tests.conftest import tiny_job
from tests.test_packing import ROWS, _loss_and_grads, _trained_model


@pytest.mark.parametrize("packing", [False, True])
def test_chunked_loss_gives_torchs_loss_and_gradients(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packing: bool
) -> None:
    """Every LoRA gradient and the loss, with prompt and padding rows ignored (full head) and on
    target rows only, equal those of transformers' own loss; three rows per chunk, so the batch
    spans many chunks and a chunk mixes ignored and target rows."""
    spec = JobSpec.model_validate(tiny_job(tiny_llama, tmp_path, data={"packing": packing}))
    tokenizer = load_tokenizer(spec.model)
    model = _trained_model(spec, tokenizer)
    base = model.get_base_model()
    assert base.loss_function is cross_entropy.causal_lm_loss
    monkeypatch.setattr(cross_entropy, "_CHUNK_BYTES", 3 * base.config.vocab_size * 4)
    features = [encode_row(row, tokenizer, max_length=128) for row in ROWS]
    batch = BatchCollator(tokenizer, "causal_lm", packing=packing)(features)
    for inputs in (batch, select_target_positions(batch)):
        chunked_loss, chunked_grads = _loss_and_grads(model, inputs)
        base.loss_function = ForCausalLMLoss
        torch_loss, torch_grads = _loss_and_grads(model, inputs)
        base.loss_function = cross_entropy.causal_lm_loss
        assert torch.allclose(chunked_loss, torch_loss, atol=1e-6), (chunked_loss, torch_loss)
        for chunked, reference in zip(chunked_grads, torch_grads, strict=True):
            assert torch.allclose(chunked, reference, atol=1e-7, rtol=1e-5)


def test_chunked_cross_entropy_reductions_match_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mean over targets and sum over ``num_items_in_batch``, ignored rows anywhere, a last chunk
    shorter than the others; without a backward pass, torch's kernel answers."""
    monkeypatch.setattr(cross_entropy, "_CHUNK_BYTES", 4 * 97 * 4)
    torch.manual_seed(0)
    logits = (torch.randn(23, 97) * 3).requires_grad_()
    target = torch.randint(0, 97, (23,))
    target[[0, 5, 6, 22]] = -100
    for items in (None, 40):
        reduction = "mean" if items is None else "sum"
        expected = torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
        expected = expected if items is None else expected / items
        (expected_grad,) = torch.autograd.grad(expected * 3, logits)
        got = cross_entropy.cross_entropy(logits, target, items)
        (got_grad,) = torch.autograd.grad(got * 3, logits)
        assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(got_grad, expected_grad, atol=1e-7)
        with torch.no_grad():
            assert torch.allclose(cross_entropy.cross_entropy(logits, target, items), expected, atol=1e-6)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_drop_mask_drops_each_element_independently_with_probability_p(p: float) -> None:
    """Each of the four 16-bit words a 64-bit draw gives drops at rate p (a draw whose top bit is
    always clear would starve one of them), and masks of neighbouring elements are uncorrelated."""
    torch.manual_seed(0)
    mask = drop_mask(torch.Size([4_000_000]), p)
    spread = 5 * (p * (1 - p) / 1_000_000) ** 0.5
    for lane in range(4):
        assert abs(mask[lane::4].float().mean().item() - p) < spread, lane
    pairs = torch.stack([mask[:-1], mask[1:]]).float()
    assert abs(torch.corrcoef(pairs)[0, 1].item()) < 0.005


def test_fast_dropout_is_inverted_dropout_forward_and_backward() -> None:
    """Kept elements are scaled by 1/(1-p) and dropped ones zeroed, in the output and in the
    gradient, with one mask; the same seed gives the same mask; eval mode and p=0 pass through."""
    x = torch.randn(64, 300, requires_grad=True)
    dropout = CpuFastDropout(0.2)
    torch.manual_seed(3)
    out = dropout(x)
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / 0.8)
    assert 0.15 < 1 - kept.float().mean().item() < 0.25
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, kept.float() / 0.8)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), out)
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(CpuFastDropout(0.0)(x), x)


def test_the_train_core_gives_every_lora_module_the_fast_dropout(tiny_llama: Path, tmp_path: Path) -> None:
    peft = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}
    spec = JobSpec.model_validate(tiny_job(tiny_llama, tmp_path, peft=peft))
    model, _ = build_model(spec, None, load_tokenizer(spec.model))
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_dropout") and len(m.lora_dropout)]
    assert lora_layers
    assert all(isinstance(d, CpuFastDropout) for m in lora_layers for d in m.lora_dropout.values())
