"""Defences against an enrolled site: identity from the node key, bounded weights, FedProx in the loss.

Each test mounts the attack and checks that the global model does not move beyond what the defence
allows. The deployment test runs a real SuperLink and SuperNodes with TLS and node authentication on
127.0.0.1; the others use Flower's own messages and strategies without a run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from federated.adapters import GlobalModel, from_record, to_record
from federated.server_app import screen
from federated.spec import load_federation
from federated.strategy.aggregation import Update, fedavg
from federated.task import ProximalTerm, RoundOrder, train_local_round
from launcher.spec import ModelSpec, PeftSpec
from tests.conftest import tiny_job

FEDERATION = {
    "name": "trust",
    "model": {"path": "tiny"},
    "peft": {"method": "lora", "r": 4, "alpha": 8},
    "min_sites": 1,
}


def federation(write_spec: Any, **changes: Any) -> Any:
    return load_federation(write_spec({**FEDERATION, **changes}, "fed.yaml"))


def adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "m.q.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
        "m.q.lora_B.weight": rng.normal(size=(5, 4)).astype(np.float32) * 0.1,
    }


def shifted(reference: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    return {k: v + by for k, v in reference.items()}


@pytest.fixture
def reply_from(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A train reply as the SuperNode ``node`` sends it (Flower stamps the sender's node id)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)

    def make(node: int, declared: str, arrays: dict[str, np.ndarray], examples: int) -> Message:
        monkeypatch.setattr(TaskIdentity, "_node_id", node)
        content = RecordDict(
            {
                "arrays": to_record(arrays),
                "metrics": MetricRecord({"num-examples": examples}),
                "site": ConfigRecord({"name": declared}),
            }
        )
        return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)

    return make


def aggregate(replies: list[Message]) -> dict[str, np.ndarray]:
    merged, _ = FedAvg(min_train_nodes=1, min_available_nodes=1).aggregate_train(1, replies)
    assert merged is not None
    return from_record(merged)


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


def test_a_reply_claiming_another_sites_name_is_refused(write_spec: Any, reply_from: Any) -> None:
    fed = federation(write_spec)
    reference = adapter(0)
    enrolled = {11: "site_a", 12: "site_b"}
    honest = reply_from(11, "site_a", shifted(reference, 0.01), 100)
    impostor = reply_from(12, "site_a", shifted(reference, 0.02), 100)  # site_b's key, site_a's name
    accepted, rejected = screen([impostor, honest], reference, fed, enrolled)
    assert [r.metadata.src_node_id for r in accepted] == [11]
    (refusal,) = rejected
    assert refusal.site_id == "site_b"
    assert "enrolled as 'site_b'" in refusal.reason and "claims to be 'site_a'" in refusal.reason
    np.testing.assert_allclose(
        aggregate(accepted)["m.q.lora_A.weight"], shifted(reference, 0.01)["m.q.lora_A.weight"]
    )


def test_an_inflated_example_count_cannot_outweigh_its_cap(write_spec: Any, reply_from: Any) -> None:
    reference = adapter(0)
    honest = {f"site_{i}": shifted(reference, 0.01 * (i + 1)) for i in range(3)}
    attack = shifted(reference, 0.05)  # inside the norm check: only its weight is a lie

    def replies() -> list[Message]:
        made = [reply_from(i + 1, s, a, 100) for i, (s, a) in enumerate(honest.items())]
        return [*made, reply_from(9, "attacker", attack, 1_000_000)]

    honest_mean = fedavg([Update(s, a, 100) for s, a in honest.items()])
    trusting = aggregate(screen(replies(), reference, federation(write_spec, weighting="examples"))[0])
    capped = aggregate(
        screen(replies(), reference, federation(write_spec))[0]
    )  # default: capped at the median
    declared = federation(
        write_spec, max_examples={"site_0": 100, "site_1": 100, "site_2": 100, "attacker": 100}
    )
    rejecting = federation(write_spec, max_examples=100, over_cap="reject")

    at_cap = fedavg([*(Update(s, a, 100) for s, a in honest.items()), Update("attacker", attack, 100)])
    assert distance(trusting, attack) < 1e-3  # unbounded: the attacker's update is the global model
    assert distance(capped, at_cap) < 1e-6  # capped: it weighs what an honest site of the cap's size weighs
    assert distance(aggregate(screen(replies(), reference, declared)[0]), at_cap) < 1e-6
    accepted, rejected = screen(replies(), reference, rejecting)
    assert [r.site_id for r in rejected] == ["attacker"] and "over its cap of 100" in rejected[0].reason
    assert distance(aggregate(accepted), honest_mean) < 1e-6
    assert distance(capped, honest_mean) < 0.3 * distance(trusting, honest_mean)


def test_weighting_rules_name_the_key(write_spec: Any) -> None:
    from launcher.errors import SpecError

    with pytest.raises(SpecError, match=r"weighting: DP noise is sized for a uniform mean"):
        federation(write_spec, weighting="examples", privacy={"dp": {}})
    with pytest.raises(SpecError, match=r"max_examples: only applies to weighting: capped"):
        federation(write_spec, weighting="uniform", max_examples=10)
    with pytest.raises(SpecError, match=r"max_examples\.site_z: not a site of this federation"):
        federation(write_spec, sites={"site_a": "a.yaml"}, max_examples={"site_z": 10})
    assert federation(write_spec, privacy={"dp": {}}).effective_weighting() == "uniform"
    assert federation(write_spec).effective_weighting() == "capped"


def test_the_proximal_term_is_half_mu_times_the_squared_distance_with_its_gradient() -> None:
    model = torch_linear()
    term = ProximalTerm(mu=0.5, anchor={"lora.weight": np.zeros((2, 3), np.float32)})
    value = term(model)
    assert float(value) == pytest.approx(0.5 * 0.5 * 6.0)
    value.backward()
    assert np.allclose(model.lora.weight.grad.numpy(), 0.5 * 1.0)


def torch_linear() -> Any:
    import torch

    model = torch.nn.Module()
    model.lora = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.lora.weight.fill_(1.0)
    return model


def test_fedprox_keeps_a_sites_adapter_closer_to_the_global_one(
    tiny_llama: Path, tmp_path: Path, write_spec: Any
) -> None:
    """Same data, steps and seed: only mu differs; the local adapter's drift shrinks with mu > 0."""
    job = write_spec(
        tiny_job(tiny_llama, tmp_path, train={"learning_rate": 5e-3, "warmup_ratio": 0.0}), "site.yaml"
    )
    peft = PeftSpec(method="lora", r=4, alpha=8, dropout=0.0)
    start = GlobalModel.build(ModelSpec(path=str(tiny_llama)), peft, None, seed=0).arrays()

    def drift(mu: float) -> float:
        order = RoundOrder(server_round=1, steps=8, proximal_mu=mu, global_rank=4, global_alpha=8.0, seed=3)
        result = train_local_round(job, tmp_path / f"mu-{mu}", order, start)
        return distance({k: result.arrays[k] for k in start}, start)

    free, proximal = drift(0.0), drift(2.0)
    assert proximal < 0.8 * free, (proximal, free)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_robust_strategies_bound_a_byzantine_site_inside_the_norm_check(
    name: str, write_spec: Any, reply_from: Any
) -> None:
    """One of five sites sends -3x the honest direction: it passes screening (3x the median norm),
    FedAvg follows it, the robust strategies stay near the honest aggregate."""
    from federated.strategy import build_strategy

    rng = np.random.default_rng(0)
    reference = adapter(0)
    direction = {k: rng.normal(size=v.shape).astype(np.float32) * 0.05 for k, v in reference.items()}
    honest = {
        f"site_{i}": {
            k: reference[k] + direction[k] + rng.normal(size=v.shape).astype(np.float32) * 0.005
            for k, v in reference.items()
        }
        for i in range(4)
    }
    byzantine = {k: reference[k] - 3.0 * direction[k] for k in reference}

    def round_of(strategy_name: str) -> dict[str, np.ndarray]:
        fed = federation(write_spec, min_sites=5, strategy={"name": strategy_name, "krum_malicious_sites": 1})
        replies = [reply_from(i + 1, s, a, 100) for i, (s, a) in enumerate(honest.items())]
        replies.append(reply_from(9, "byzantine", byzantine, 100))
        accepted, rejected = screen(replies, reference, fed)
        assert not rejected, "the attack is inside every bound"
        merged, _ = build_strategy(fed).aggregate_train(1, accepted)
        assert merged is not None
        return from_record(merged)

    honest_mean = fedavg([Update(s, a, 1) for s, a in honest.items()])
    step = distance(honest_mean, reference)  # how far one honest round moves the adapter
    assert distance(round_of("fedavg"), honest_mean) > 0.7 * step  # FedAvg is dragged back past the start
    assert distance(round_of(name), honest_mean) < 0.25 * step
