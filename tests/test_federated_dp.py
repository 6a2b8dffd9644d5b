"""Differential privacy end to end in Flower's simulation engine, with an (epsilon, delta) account.

Each federation trains the tiny Llama at 2-3 sites. The test recomputes epsilon with Google's
dp-accounting directly (not through Flotilla or Flower) and compares it with what the rounds report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from flwr.app import Context, Message

from federated.adapters import from_record, to_record
from federated.ops.simulation import simulate
from federated.rounds import RoundStore
from federated.spec import load_federation
from launcher.errors import SpecError
from tests.conftest import tiny_job

SITES = ("site_a", "site_b", "site_c")


def federation(tiny_llama: Path, tmp_path: Path, write_spec: Any, **changes: Any) -> Any:
    sites = {}
    for site in SITES:
        job = tiny_job(tiny_llama, tmp_path / site, data={"max_train_rows": 24, "max_validation_rows": 8})
        sites[site] = str(write_spec(job, f"{site}.yaml"))
    spec = {
        "name": "dp",
        "model": {"path": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "min_sites": 3,
        "local": {"steps": 2},
        "sites": sites,
        "output": str(tmp_path / "out"),
        **changes,
    }
    return load_federation(write_spec(spec, "fed.yaml"))


def expected_epsilon(noise: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian releases of a sum of clipped updates, recomputed with
    dp-accounting: adding or removing one site moves the sum by at most the clipping norm."""
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(dp_accounting.GaussianDpEvent(noise), rounds)
    return accountant.get_epsilon(delta)


def test_server_side_dp_reports_epsilon_and_stops_when_the_budget_is_spent(
    tiny_llama: Path, tmp_path: Path, write_spec: Any
) -> None:
    dp = {"side": "server", "noise_multiplier": 2.0, "clipping_norm": 0.5, "delta": 1e-5}
    budget = float(expected_epsilon(2.0, 2, 1e-5) + expected_epsilon(2.0, 3, 1e-5)) / 2  # room for 2 rounds
    fed = federation(
        tiny_llama, tmp_path, write_spec, rounds=3, privacy={"dp": {**dp, "max_epsilon": budget}}
    )
    work_dir = tmp_path / "out" / "dp"
    simulate(fed, work_dir)
    store = RoundStore(work_dir)
    rows = store.rows()
    assert [r["round"] for r in rows] == [0, 1, 2], "the third round would have overspent"
    for row in rows[1:]:
        assert row["privacy"]["rounds"] == row["round"]
        assert row["privacy"]["epsilon"] == pytest.approx(expected_epsilon(2.0, row["round"], 1e-5), rel=1e-6)
        assert {s["status"] for s in row["sites"]} == {"accepted"}
    summary = (work_dir / "summary.json").read_text()
    assert "privacy budget spent before round 3" in summary


def test_client_side_dp_meets_a_target_epsilon_over_the_rounds(
    tiny_llama: Path, tmp_path: Path, write_spec: Any
) -> None:
    dp = {"side": "client", "target_epsilon": 8.0, "clipping_norm": 0.5, "delta": 1e-5}
    fed = federation(tiny_llama, tmp_path, write_spec, rounds=2, privacy={"dp": dp})
    work_dir = tmp_path / "out" / "dp"
    simulate(fed, work_dir)
    last = RoundStore(work_dir).rows()[-1]["privacy"]
    assert last["rounds"] == 2
    assert last["epsilon"] == pytest.approx(expected_epsilon(last["noise_multiplier"], 2, 1e-5), rel=1e-6)
    assert 7.9 < last["epsilon"] <= 8.0  # the smallest noise that meets the target
    for site in SITES:  # every site clipped its own update before it left
        assert (work_dir / "sites" / site / "round-002" / "summary.json").is_file()


def nan_from_site_c(msg: Message, context: Context, call_next: Any) -> Message:
    """site_c trains, then corrupts its reply: screening rejects it."""
    reply = call_next(msg, context)
    if int(context.node_config["partition-id"]) == 2 and reply.has_content() and "arrays" in reply.content:
        arrays = {k: v.copy() for k, v in from_record(reply.content["arrays"]).items()}
        first = next(iter(arrays))
        arrays[first].flat[0] = np.nan
        reply.content["arrays"] = to_record(arrays)
    return reply


def test_a_round_with_fewer_updates_than_the_noise_is_sized_for_is_refused(
    tiny_llama: Path, tmp_path: Path, write_spec: Any
) -> None:
    dp = {"side": "server", "noise_multiplier": 2.0, "clipping_norm": 0.5}
    fed = federation(tiny_llama, tmp_path, write_spec, rounds=1, min_sites=2, privacy={"dp": dp})
    work_dir = tmp_path / "out" / "dp"
    with pytest.raises(Exception, match=r"2 valid update.*DP noise is sized for 3.*not released"):
        simulate(fed, work_dir, extra_mods=[nan_from_site_c])
    store = RoundStore(work_dir)
    assert store.last_completed() == 0, "the under-noised round was not committed"


def test_dp_misconfigurations_name_the_key(tiny_llama: Path, tmp_path: Path, write_spec: Any) -> None:
    cases = {
        "strategy.name: DP noise is sized for the mean of clipped updates": {
            "strategy": {"name": "median"},
            "privacy": {"dp": {}},
        },
        "privacy.dp.target_epsilon: needs clipping: fixed": {
            "privacy": {"dp": {"clipping": "adaptive", "clipped_count_stddev": 1.0, "target_epsilon": 4.0}}
        },
        "privacy.dp.noise_multiplier: give noise_multiplier or target_epsilon": {
            "privacy": {"dp": {"noise_multiplier": 1.0, "target_epsilon": 4.0}}
        },
        "privacy.dp.noise_multiplier: must be above 0": {"privacy": {"dp": {"noise_multiplier": 0.0}}},
    }
    for expected, changes in cases.items():
        with pytest.raises(SpecError, match=expected.replace(".", r"\.")):
            federation(tiny_llama, tmp_path, write_spec, **changes)
