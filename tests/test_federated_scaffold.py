"""``local.scaffold``: SCAFFOLD's variates derived at the site equal the ones SCAFFOLD's server would
send, and each local step is corrected by them (real train core, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from federated.control_variates import STEPS_FILE, VARIATES_FILE, round_variates
from federated.spec import load_federation
from federated.task import RoundOrder, train_local_round
from launcher.errors import FlotillaError
from tests.conftest import UNIT_FEDERATION

STEPS, LR, SERVER_STEP = 4, 2e-3, 2.0  # LR: constant_rate_site's rate


@pytest.fixture
def site(constant_rate_site: tuple[Path, dict[str, np.ndarray]]) -> tuple[Path, dict[str, np.ndarray]]:
    return constant_rate_site


def order(server_round: int, scaffold: bool, seed: int, rank: int = 4) -> RoundOrder:
    return RoundOrder(
        server_round=server_round,
        steps=STEPS,
        scaffold=scaffold,
        server_step=SERVER_STEP,
        global_rank=rank,
        global_alpha=2.0 * rank,
        seed=seed,
    )


def test_the_derived_variates_are_scaffolds_and_correct_every_step(
    site: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    job, x0 = site
    work = tmp_path / "a"
    first = train_local_round(job, work, order(1, True, seed=1), x0)
    lr_sum = STEPS * LR
    variates = load_file(str(first.run_dir / VARIATES_FILE))
    assert not any(np.any(v) for v in variates.values())  # round 1: c = c_i = 0
    assert json.loads((first.run_dir / STEPS_FILE).read_text())["lr_sum"] == pytest.approx(lr_sum)
    # the server's step (FedAvgM without momentum) over this site and another one, equal weights
    generator = np.random.default_rng(0)
    own = {k: x0[k] - first.arrays[k] for k in x0}
    other = {k: generator.normal(0.0, float(np.abs(v).mean()) + 1e-6, v.shape) for k, v in own.items()}
    mean_drift = {k: 0.5 * (own[k] + other[k]) for k in x0}
    x1 = {k: (x0[k] - SERVER_STEP * mean_drift[k]).astype(np.float32) for k in x0}

    corrected = train_local_round(job, work, order(2, True, seed=1), x1)
    variates = load_file(str(corrected.run_dir / VARIATES_FILE))
    moved = [k for k in x0 if np.any(own[k])]
    assert moved
    for key in moved:
        # SCAFFOLD's server: c = mean of (x - y_j) / S; the site: c_i = (x - y_a) / S (c_i, c were 0)
        scale = float(np.abs(mean_drift[key]).max()) / lr_sum
        np.testing.assert_allclose(variates["global." + key], mean_drift[key] / lr_sum, atol=1e-4 * scale)
        np.testing.assert_allclose(variates["site." + key], own[key] / lr_sum, atol=1e-4 * scale)

    # the same round without the correction: the difference is the correction's direction
    plain = train_local_round(job, tmp_path / "plain", order(2, False, seed=1), x1)
    shift = np.concatenate([(corrected.arrays[k] - plain.arrays[k]).ravel() for k in moved])
    wanted = -np.concatenate([(variates["global." + k] - variates["site." + k]).ravel() for k in moved])
    assert np.any(shift), "the correction changed nothing"
    cosine = float(shift @ wanted / (np.linalg.norm(shift) * np.linalg.norm(wanted)))
    assert cosine > 0.9, cosine
    ratio = float(np.linalg.norm(shift) / (STEPS * LR * np.linalg.norm(wanted)))
    assert 0.5 < ratio < 2.0, ratio  # about STEPS x lr x (c_i - c)


def test_a_site_at_another_rank_is_refused(site: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    job, x0 = site
    with pytest.raises(FlotillaError, match=r"peft\.r / peft\.alpha: local\.scaffold .*rank 8"):
        train_local_round(job, tmp_path / "a", order(1, True, 1, rank=8), x0)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"strategy": {"name": "fedadam"}}, "weighted-mean server step"),
        ({"strategy": {"name": "fedavgm"}}, "weighted-mean server step"),  # momentum 0.9 by default
        ({"sites_per_round": 2, "min_sites": 2}, "every site in every round"),
    ],
)
def test_scaffold_needs_a_mean_step_and_every_site(
    write_spec: Any, changes: dict[str, Any], needle: str
) -> None:
    spec = {**UNIT_FEDERATION, "local": {"scaffold": True}, **changes}
    with pytest.raises(FlotillaError, match=rf"local\.scaffold: .*{needle}"):
        load_federation(write_spec(spec, "fed.yaml"))
    accepted = {**spec, "strategy": {"name": "fedavgm", "server_momentum": 0.0}}
    accepted.pop("sites_per_round", None)
    accepted["min_sites"] = 3
    assert load_federation(write_spec(accepted, "fed.yaml")).local.scaffold


def test_a_saved_state_that_does_not_fit_the_round_is_refused_by_name(tmp_path: Path) -> None:
    previous = tmp_path / "round-001"
    (previous / "global").mkdir(parents=True)
    (previous / "adapter").mkdir()
    tensor = {"lora_A.weight": np.ones((2, 3), np.float32)}
    save_file(tensor, str(previous / "global" / "adapter_model.safetensors"))
    save_file(tensor, str(previous / "adapter" / "adapter_model.safetensors"))
    save_file(
        {f"{side}.lora_A.weight": tensor["lora_A.weight"] for side in ("site", "global")},
        str(previous / VARIATES_FILE),
    )
    (previous / STEPS_FILE).write_text(json.dumps({"lr_sum": 0.1}))
    federation, site = round_variates(tmp_path, 2, tensor, 1.0)
    assert set(federation) == set(site) == set(tensor)
    with pytest.raises(FlotillaError, match=r"local\.scaffold: .*round-001 holds no state .*lora_B\.weight"):
        round_variates(tmp_path, 2, {**tensor, "lora_B.weight": np.ones((3, 2), np.float32)}, 1.0)
