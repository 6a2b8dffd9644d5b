"""Full fine-tune with frozen layers and gradual unfreezing, through the CLI on a tiny Llama."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import flotilla, tiny_job


def test_frozen_layers_stay_put_and_scheduled_layers_train_from_their_step(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = tiny_job(
        tiny_llama,
        tmp_path,
        model={
            "freeze": [r"embed_tokens"],
            "unfreeze_schedule": [{"step": 3, "patterns": [r"layers\.1\.mlp\."]}],
        },
        peft={"method": "none"},
        train={"learning_rate": 1e-4, "max_steps": 6, "save_steps": 2},
    )
    result = flotilla("run", str(write_spec(spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    initial = load_file(tiny_llama / "model.safetensors")
    at_step_2 = load_file(run_dir / "checkpoints" / "checkpoint-2" / "model.safetensors")
    final = load_file(run_dir / "model" / "model.safetensors")
    scheduled = "model.layers.1.mlp.up_proj.weight"
    trained = "model.layers.0.self_attn.q_proj.weight"
    frozen = "model.embed_tokens.weight"
    assert torch.equal(at_step_2[scheduled], initial[scheduled])
    assert not torch.equal(final[scheduled], initial[scheduled])
    assert not torch.equal(at_step_2[trained], initial[trained])
    assert torch.equal(final[frozen], initial[frozen])
