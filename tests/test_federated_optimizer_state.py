"""``local.optimizer_state: keep``: a site's AdamW moments carry from one round to its next, stay at
the site and change what the next round trains (real train core, tiny model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federated.optimizer_state import STATE_FILE
from federated.task import RoundOrder, train_local_round
from launcher.errors import FlotillaError

STEPS = 6


@pytest.fixture
def site(constant_rate_site: tuple[Path, dict[str, np.ndarray]]) -> tuple[Path, dict[str, np.ndarray]]:
    return constant_rate_site


def order(server_round: int, keep: bool, lr_scale: float = 1.0) -> RoundOrder:
    return RoundOrder(
        server_round=server_round,
        steps=STEPS,
        lr_scale=lr_scale,
        keep_optimizer_state=keep,
        global_rank=4,
        global_alpha=8.0,
        seed=3,
    )


def test_kept_moments_continue_into_the_next_round_and_never_travel(
    site: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    job, start = site
    first = {
        keep: train_local_round(job, tmp_path / f"keep-{keep}", order(1, keep), start)
        for keep in (True, False)
    }
    # round 1 has nothing to carry: both modes train the same adapter
    for key in start:
        np.testing.assert_array_equal(first[True].arrays[key], first[False].arrays[key])
    assert set(first[True].arrays) == set(start)  # the state is not part of the reply

    second = {
        keep: train_local_round(
            job, tmp_path / f"keep-{keep}", order(2, keep, lr_scale=0.5), first[True].arrays
        )
        for keep in (True, False)
    }
    saved = torch.load(second[True].run_dir / STATE_FILE, weights_only=True)
    steps = {int(moments["step"]) for moments in saved["state"].values()}
    assert steps == {2 * STEPS}, steps  # round 2's AdamW went on from round 1's 6 steps
    assert not (second[False].run_dir / STATE_FILE).exists()
    moved = max(float(np.abs(second[True].arrays[k] - second[False].arrays[k]).max()) for k in start)
    assert moved > 1e-5, moved  # the carried moments changed round 2's training


def test_a_state_that_does_not_fit_the_round_is_refused_by_name(
    site: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    job, start = site
    work = tmp_path / "site"
    first = train_local_round(job, work, order(1, True), start)
    state_file = first.run_dir / STATE_FILE
    saved = torch.load(state_file, weights_only=True)
    for moments in saved["state"].values():
        moments["exp_avg"] = torch.zeros(3, 3)
    torch.save(saved, state_file)
    with pytest.raises(FlotillaError, match=r"local\.optimizer_state=keep: .*does not fit"):
        train_local_round(job, work, order(2, True), first.arrays)
