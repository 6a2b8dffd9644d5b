"""The memory estimate behind ``flotilla plan``: model states against DeepSpeed's own estimators,
activations against the tensors autograd really keeps, and ``--fit`` through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.model.load import enable_gradient_checkpointing
from launcher.plan.fit import cheapest_fit
from launcher.plan.memory import (
    GIB,
    RESERVED_BYTES,
    ModelShape,
    Setup,
    estimate,
    model_shape,
    parameter_counts,
    parse_size,
    saved_activation_bytes,
)
from tests.conftest import REPO, flotilla

#: SmolLM2-135M's own shape (fully trainable: DeepSpeed's estimators assume a full fine-tune).
SMOLLM2 = ModelShape(
    total_params=134_515_008,
    trainable_params=134_515_008,
    largest_layer_params=28_311_552,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    kv_size=192,
    vocab_size=49152,
)


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 4)])
def test_zero2_model_states_equal_deepspeeds_estimate(gpus: int, nodes: int) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for offload in (False, True):
        setup = Setup(stage=2, offload_optimizer=offload, gpus_per_node=gpus, nodes=nodes)
        _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(
            SMOLLM2.total_params, gpus, nodes, cpu_offload=offload
        )
        assert estimate(SMOLLM2, setup).model_states == pytest.approx(deepspeed_gpu, abs=16)


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 4)])
def test_zero3_model_states_match_deepspeeds_estimate(gpus: int, nodes: int) -> None:
    """Equal with offload; without it ours also counts the 16-bit gradient partition that ZeRO-3
    keeps beside the fp32 one (2 bytes per parameter per rank), which DeepSpeed's formula leaves out."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    world = gpus * nodes
    for offload_optimizer, offload_params in ((False, False), (True, False), (True, True)):
        setup = Setup(
            stage=3,
            offload_optimizer=offload_optimizer,
            offload_params=offload_params,
            gpus_per_node=gpus,
            nodes=nodes,
        )
        _, deepspeed_gpu, _ = estimate_zero3_model_states_mem_needs(
            SMOLLM2.total_params,
            SMOLLM2.largest_layer_params,
            gpus,
            nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params,
        )
        extra = 0 if offload_optimizer else 2 * SMOLLM2.total_params // world
        assert estimate(SMOLLM2, setup).model_states == pytest.approx(deepspeed_gpu + extra, abs=16)


def test_lora_keeps_optimizer_states_only_for_the_adapter() -> None:
    lora = ModelShape(**{**SMOLLM2.__dict__, "trainable_params": 4_884_480})
    full, adapter = estimate(SMOLLM2, Setup()), estimate(lora, Setup())
    assert adapter.params == full.params
    assert adapter.optimizer == 16 * lora.trainable_params
    assert adapter.model_states < full.model_states / 5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_saved_activations_match_what_autograd_keeps(checkpointing: bool) -> None:
    """The estimate is within 15% of the bytes of every tensor saved for backward (weights excluded)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, length = 2, 128
    ids = torch.randint(0, config.vocab_size, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    shape = model_shape(config, *parameter_counts(model))
    setup = Setup(
        precision="fp32", micro_batch_size=batch, seq_len=length, gradient_checkpointing=checkpointing
    )
    assert saved_activation_bytes(shape, setup) == pytest.approx(sum(saved.values()), rel=0.15)


def test_checkpointing_cuts_activations_to_under_half() -> None:
    """At sequence 1024 SmolLM2's logits (vocabulary 49152) stay; everything per layer shrinks."""
    plain = estimate(SMOLLM2, Setup(micro_batch_size=4, seq_len=1024)).activations
    checkpointed = estimate(SMOLLM2, Setup(micro_batch_size=4, seq_len=1024, gradient_checkpointing=True))
    assert checkpointed.activations < plain / 2


def test_fit_prefers_no_offload_then_the_lowest_stage_then_offload() -> None:
    base = Setup(gpus_per_node=8, seq_len=2048)
    roomy = cheapest_fit(SMOLLM2, base, 80 * GIB, global_batch=64)
    assert roomy is not None
    assert (roomy.setup.stage, roomy.setup.offload_optimizer, roomy.setup.micro_batch_size) == (0, False, 8)
    tight = cheapest_fit(SMOLLM2, base, 4 * GIB, global_batch=64)
    assert tight is not None and tight.estimate.total <= 4 * GIB - RESERVED_BYTES
    assert (tight.setup.stage, tight.setup.offload_optimizer, tight.setup.gradient_checkpointing) == (
        1,
        False,
        True,
    )
    tighter = cheapest_fit(SMOLLM2, base, 3 * GIB, global_batch=64)
    assert tighter is not None and (tighter.setup.stage, tighter.setup.offload_optimizer) == (3, True)
    assert cheapest_fit(SMOLLM2, base, 2 * GIB, global_batch=64) is None


@pytest.mark.parametrize(("text", "size"), [("80GiB", 80 * GIB), ("40GB", 40 * 10**9), ("512MiB", 2**29)])
def test_memory_sizes_are_read_with_their_units(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_plan_prints_the_estimate_and_the_cheapest_fit() -> None:
    result = flotilla(
        "plan", str(REPO / "configs" / "quickstart.yaml"), "--gpu-memory", "2GiB", "--gpus", "8", "--fit"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory per GPU" in result.stdout
    assert "cheapest fit: ZeRO-" in result.stdout
    assert "run it with: flotilla run" in result.stdout


def test_plan_says_clearly_when_nothing_fits(tmp_path: Path) -> None:
    result = flotilla("plan", str(REPO / "configs" / "quickstart.yaml"), "--gpu-memory", "1.6GiB", "--fit")
    assert result.returncode == 2
    assert "nothing fits in 1.6GiB" in result.stderr
    assert "Traceback" not in result.stderr
    bad: Any = flotilla("plan", str(REPO / "configs" / "quickstart.yaml"), "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr and "Traceback" not in bad.stderr
