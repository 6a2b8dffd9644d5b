"""Logit-adjusted training: the head's logits are shifted by tau * log(label prior) in training only."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from federated.server_app import round_config
from federated.spec import load_federation
from federated.task import RoundOrder, _overrides
from launcher.errors import SpecError
from launcher.model import apply_peft, load_model
from launcher.spec import ModelSpec, PeftSpec
from launcher.train.logit_adjustment import adjust_logits_in_training, label_log_prior

LABELS = ["a", "b", "c"]


def test_the_prior_is_each_labels_smoothed_share_and_finite_for_a_missing_label() -> None:
    prior = label_log_prior([0, 0, 0, 0, 1], len(LABELS))
    assert prior.exp().tolist() == pytest.approx([5 / 8, 2 / 8, 1 / 8])


def test_training_shifts_the_logits_and_the_loss_and_evaluation_does_not() -> None:
    model = load_model(ModelSpec(path="minilm-l6", task="sequence_classification"), LABELS)
    model = apply_peft(
        model,
        PeftSpec(method="lora", r=4, alpha=8, target_modules=["query", "value"]),
        "sequence_classification",
    )
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # train and eval modes then differ by the adjustment only
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([[101, 2000, 2001, 102], [101, 3000, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.tensor([1, 2]),
    }
    model.eval()
    plain = model(**batch)
    offsets = 1.5 * label_log_prior([0] * 90 + [1] * 9 + [2], len(LABELS))
    handle = adjust_logits_in_training(model, offsets)

    model.train()
    adjusted = model(**batch)
    torch.testing.assert_close(adjusted.logits - plain.logits, offsets.expand(2, -1))
    expected = torch.nn.functional.cross_entropy(plain.logits + offsets, batch["labels"])
    torch.testing.assert_close(adjusted.loss, expected)
    assert adjusted.loss > plain.loss  # the rare labels' targets are pushed down: learning must lift them

    model.eval()
    torch.testing.assert_close(model(**batch).logits, plain.logits)
    handle.remove()


def test_a_federation_asks_each_site_to_adjust_by_its_own_label_mix(write_spec: Any, tmp_path: Any) -> None:
    base = {
        "name": "la",
        "model": {"path": "minilm-l6", "task": "sequence_classification"},
        "labels": LABELS,
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "rounds": 2,
        "min_sites": 1,
        "local": {"steps": 2, "logit_adjustment": 0.5},
    }
    fed = load_federation(write_spec(base, "fed.yaml"))
    order = RoundOrder.from_config({**round_config(fed, 1), "server-round": 1})
    assert order.logit_adjustment == 0.5
    assert "train.logit_adjustment=0.5" in _overrides(order, tmp_path, tmp_path)
    default = {**base, "local": {"steps": 2}}
    assert round_config(load_federation(write_spec(default, "default.yaml")), 1)["logit-adjustment"] == 1.0
    off = {**base, "local": {"steps": 2, "logit_adjustment": 0}}
    assert "logit-adjustment" not in round_config(load_federation(write_spec(off, "off.yaml")), 1)
    assert "logit-adjustment" not in round_config(
        load_federation(write_spec(plain_causal(base), "c.yaml")), 1
    )
    causal = {**plain_causal(base), "local": {"steps": 2, "logit_adjustment": 0.5}}
    with pytest.raises(SpecError, match=r"local\.logit_adjustment"):
        load_federation(write_spec(causal, "causal.yaml"))


def plain_causal(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` as a causal-LM federation (no labels, no adjustment asked for)."""
    return {**base, "model": {"path": "tiny"}, "labels": None, "local": {"steps": 2}}
