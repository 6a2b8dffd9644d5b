"""Federated pieces without a Flower run: spec rules, strategies, DP wiring, update screening, keys."""

from __future__ import annotations

import itertools
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from federated.adapters import from_record, to_record
from federated.ops import deploy
from federated.ops.keys import create_trial_keys
from federated.server_app import round_config, screen
from federated.spec import load_federation
from federated.strategy.aggregation import fedavg, lora_pairs
from federated.strategy.strategies import (
    FedAvgMomentum,
    LoraProductAverage,
    build_strategy,
    restore_state,
    strategy_state,
)
from federated.task import RoundOrder, fit_rank
from launcher.errors import FlotillaError, SpecError
from tests.conftest import REPO, UNIT_FEDERATION

pytestmark = pytest.mark.usefixtures("task_identity")
BASE = UNIT_FEDERATION


def fed_spec(write_spec: Any, **changes: Any) -> Any:
    return load_federation(write_spec({**BASE, **changes}, "fed.yaml"))


def test_spec_errors_name_the_key_and_what_is_allowed(write_spec: Any) -> None:
    with pytest.raises(SpecError) as bad_key:
        fed_spec(write_spec, strategy={"nmae": "fedavg"})
    assert "strategy.nmae: unknown key; did you mean 'name'?" in str(bad_key.value)
    with pytest.raises(SpecError) as secagg:
        fed_spec(write_spec, strategy={"name": "median"}, privacy={"secagg": {}})
    assert "privacy.secagg" in str(secagg.value) and "only sees the sum" in str(secagg.value)
    with pytest.raises(SpecError) as labels:
        fed_spec(write_spec, model={"path": "minilm-l6", "task": "sequence_classification"})
    assert "labels" in str(labels.value)
    with pytest.raises(SpecError) as sites:
        fed_spec(write_spec, min_sites=4)
    assert "min_sites" in str(sites.value)
    for sampled, needle in ((2, "fewer than min_sites=3"), (4, "more than the 3 listed sites")):
        with pytest.raises(SpecError) as sampling:
            fed_spec(write_spec, sites_per_round=sampled)
        assert f"sites_per_round: {sampled} is {needle}" in str(sampling.value)
    strategy = build_strategy(fed_spec(write_spec, min_sites=2, sites_per_round=2))
    assert strategy.min_train_nodes == 2 and int(3 * strategy.fraction_train) == 0


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("fedavg", FedAvg),
        ("fedprox", FedProx),
        ("fedadam", FedAdam),
        ("fedavgm", FedAvgMomentum),
        ("fedyogi", FedYogi),
        ("median", FedMedian),
        ("trimmed_mean", FedTrimmedAvg),
        ("krum", Krum),
        ("lora_product", LoraProductAverage),
    ],
)
def test_every_strategy_name_builds_a_flower_strategy(write_spec: Any, name: str, kind: type) -> None:
    strategy = build_strategy(fed_spec(write_spec, strategy={"name": name}))
    assert type(strategy) is kind
    assert strategy.min_train_nodes == 3


def test_dp_wrappers_carry_the_spec_parameters(write_spec: Any) -> None:
    server = build_strategy(
        fed_spec(write_spec, privacy={"dp": {"noise_multiplier": 0.3, "clipping_norm": 2.5}})
    )
    assert isinstance(server, DifferentialPrivacyServerSideFixedClipping)
    assert (server.noise_multiplier, server.clipping_norm, server.num_sampled_clients) == (0.3, 2.5, 3)
    client = fed_spec(
        write_spec,
        privacy={
            "dp": {
                "side": "client",
                "clipping": "adaptive",
                "clipping_norm": 0.7,
                "clipped_count_stddev": 1.0,
            }
        },
    )
    strategy = build_strategy(client)
    assert isinstance(strategy, DifferentialPrivacyClientSideAdaptiveClipping)
    assert strategy.clipping_norm == 0.7 and isinstance(strategy.strategy, FedAvg)
    assert round_config(client, 1)["dp-clipping"] == "adaptive"
    with pytest.raises(FlotillaError, match=r"privacy\.dp: .*clipped_count_stddev"):
        build_strategy(fed_spec(write_spec, privacy={"dp": {"clipping": "adaptive"}}))


def test_strategy_state_survives_a_restart(write_spec: Any) -> None:
    fedadam = fed_spec(write_spec, strategy={"name": "fedadam"})
    strategy = build_strategy(fedadam)
    strategy.m_t = {"w": np.arange(3.0)}
    strategy.v_t = {"w": np.ones(3)}
    dp = {"clipping": "adaptive", "clipped_count_stddev": 1.0}
    adaptive_spec = fed_spec(write_spec, privacy={"dp": dp})
    adaptive = build_strategy(adaptive_spec)
    adaptive.clipping_norm = 0.123
    fresh, fresh_adaptive = build_strategy(fedadam), build_strategy(adaptive_spec)
    restore_state(fresh, *strategy_state(strategy))
    restore_state(fresh_adaptive, *strategy_state(adaptive))
    assert fresh_adaptive.clipping_norm == 0.123
    np.testing.assert_array_equal(fresh.m_t["w"], np.arange(3.0))
    np.testing.assert_array_equal(fresh.v_t["w"], np.ones(3))
    momentum = build_strategy(fed_spec(write_spec, strategy={"name": "fedavgm"}))
    assert (momentum.server_learning_rate, momentum.server_momentum) == (1.0, 0.9)
    momentum.momentum_vector = [np.arange(3.0), np.ones((2, 2))]
    resumed = build_strategy(fed_spec(write_spec, strategy={"name": "fedavgm"}))
    restore_state(resumed, *strategy_state(momentum))
    assert [v.tolist() for v in resumed.momentum_vector] == [[0.0, 1.0, 2.0], [[1.0, 1.0], [1.0, 1.0]]]


def test_cosine_schedule_over_rounds_reaches_its_floor_at_the_last_round(write_spec: Any) -> None:
    spec = fed_spec(write_spec, rounds=5, local={"steps": 4, "lr_schedule": "cosine", "min_lr_ratio": 0.2})
    scales = [round_config(spec, r)["lr-scale"] for r in range(1, 6)]
    assert scales[0] == 1.0 and abs(scales[-1] - 0.2) < 1e-12
    assert all(a > b for a, b in itertools.pairwise(scales)), scales
    assert round_config(fed_spec(write_spec, rounds=5), 3)["lr-scale"] == 1.0


def test_sites_keep_their_optimizer_state_by_default_for_classification_only(write_spec: Any) -> None:
    classifier = {"model": {"path": "minilm-l6", "task": "sequence_classification"}, "labels": ["a", "b"]}
    kept = {
        name: RoundOrder.from_config({**round_config(spec, 2), "server-round": 2}).keep_optimizer_state
        for name, spec in (
            ("classification", fed_spec(write_spec, **classifier)),
            ("causal_lm", fed_spec(write_spec)),
            ("classification, reset", fed_spec(write_spec, **classifier, local={"optimizer_state": "reset"})),
            ("causal_lm, keep", fed_spec(write_spec, local={"optimizer_state": "keep"})),
        )
    }
    assert kept == {
        "classification": True,
        "causal_lm": False,
        "classification, reset": False,
        "causal_lm, keep": True,
    }


def test_ffa_lora_sites_send_b_and_the_global_a_never_moves(write_spec: Any) -> None:
    spec = fed_spec(write_spec, sites={}, min_sites=1, peft={"freeze_lora_a": True})
    reference = adapter(0)
    a_key = "m.q.lora_A.weight"
    sent = []
    for i in range(3):
        update = {k: v + 0.01 * (i + 1) for k, v in reference.items() if k != a_key}
        sent.append(update)
    tampered = {**sent[0], a_key: reference[a_key] + 5.0}  # a site may not move the shared A
    accepted, rejected = screen(
        [reply(f"s{i}", a, 10) for i, a in enumerate([tampered, *sent[1:]])], reference, spec
    )
    assert not rejected and len(accepted) == 3
    for message in accepted:
        np.testing.assert_array_equal(from_record(message.content["arrays"])[a_key], reference[a_key])
    assert round_config(spec, 1)["frozen-lora-a"] is True


def adapter(seed: int, rank: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "m.q.lora_A.weight": rng.normal(size=(rank, 6)).astype(np.float32),
        "m.q.lora_B.weight": rng.normal(size=(5, rank)).astype(np.float32) * 0.1,
        "m.head.weight": rng.normal(size=(2, 6)).astype(np.float32),
    }


def reply(site: str, arrays: dict[str, np.ndarray], examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": to_record(arrays),
            "metrics": MetricRecord({"num-examples": examples, "eval_loss": 1.0}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_poisoned_updates_are_rejected_and_the_global_adapter_is_unaffected(write_spec: Any) -> None:
    spec = fed_spec(write_spec, sites={}, min_sites=1, weighting="examples")  # weights: test_federated_trust
    reference = adapter(0)
    honest = {f"site{i}": {k: v + 0.01 * (i + 1) for k, v in reference.items()} for i in range(3)}
    nan = {k: v.copy() for k, v in reference.items()}
    nan["m.q.lora_A.weight"][0, 0] = np.nan
    shape = {**reference, "m.q.lora_B.weight": np.zeros((5, 3), np.float32)}
    huge = {k: v + 100.0 for k, v in reference.items()}
    replies = [reply(s, a, 10 * (i + 1)) for i, (s, a) in enumerate(honest.items())]
    replies += [reply("nan", nan, 10), reply("shape", shape, 10), reply("huge", huge, 10)]
    accepted, rejected = screen(replies, reference, spec)
    reasons = {r.site_id: r.reason for r in rejected}
    assert set(reasons) == {"nan", "shape", "huge"}
    assert "NaN" in reasons["nan"] and "shape" in reasons["shape"] and "norm" in reasons["huge"]
    merged, _ = FedAvg(min_train_nodes=1, min_available_nodes=1).aggregate_train(1, accepted)
    from federated.strategy.aggregation import Update

    expected = fedavg([Update(s, a, 10 * (i + 1)) for i, (s, a) in enumerate(honest.items())])
    for key, value in from_record(merged).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-7)


def test_lora_product_strategy_merges_sites_of_different_ranks() -> None:
    sites = [adapter(1, rank=4), adapter(2, rank=2)]
    replies = [reply(f"s{i}", a, 10) for i, a in enumerate(sites)]
    for message, rank in zip(replies, (4, 2), strict=True):
        message.content["metrics"] = MetricRecord({"num-examples": 10, "lora-rank": rank, "lora-alpha": 8.0})
    strategy = LoraProductAverage(4, 8.0, min_train_nodes=1, min_available_nodes=1)
    merged, _ = strategy.aggregate_train(1, replies)
    out = from_record(merged)
    product = out["m.q.lora_B.weight"] @ out["m.q.lora_A.weight"]
    expected = sum(
        0.5 * (8.0 / r) / 2.0 * (a["m.q.lora_B.weight"] @ a["m.q.lora_A.weight"])
        for a, r in zip(sites, (4, 2), strict=True)
    )
    assert out["m.q.lora_A.weight"].shape == (4, 6)
    # rank 4 < 4 + 2 stacked directions: the best rank-4 approximation, close but not exact
    assert np.linalg.norm(product - expected) < 0.35 * np.linalg.norm(expected)


def test_a_site_of_another_rank_gets_the_best_factors_and_trainable_rows() -> None:
    global_arrays = adapter(3, rank=4)
    global_arrays["m.q.lora_B.weight"][:, 2:] = 0.0  # the global update has rank 2
    order = RoundOrder(server_round=1, global_rank=4, global_alpha=8.0)
    local = fit_rank(global_arrays, rank=3, alpha=6.0, order=order, seed=0)
    a_key, b_key = lora_pairs(local)["m.q"]
    assert local[a_key].shape == (3, 6) and local[b_key].shape == (5, 3)
    delta = (8.0 / 4) * global_arrays[b_key] @ global_arrays[a_key]
    np.testing.assert_allclose((6.0 / 3) * local[b_key] @ local[a_key], delta, atol=1e-5)
    assert np.all(np.any(local[a_key] != 0, axis=1)), "every A row can learn"


def test_trial_keys_chain_to_the_ca_and_load_as_flower_expects(tmp_path: Path) -> None:
    keys = create_trial_keys(tmp_path, ["site_a", "site_b"], hosts=["fed.example.org"])
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fed.example.org" in names.get_values_for_type(x509.DNSName)
    assert any(str(ip) == "127.0.0.1" for ip in names.get_values_for_type(x509.IPAddress))
    private, public = keys.site_keys["site_a"]
    assert private.stat().st_mode & 0o077 == 0
    serialization.load_ssh_private_key(private.read_bytes(), None)
    serialization.load_ssh_public_key(public.read_bytes())
    with pytest.raises(FlotillaError, match="already holds a CA"):
        create_trial_keys(tmp_path, ["site_a"])
    with pytest.raises(FlotillaError, match="site names"):
        create_trial_keys(tmp_path / "other", ["bad name"])


def test_pyproject_flower_app_matches_the_deployed_components() -> None:
    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    generated = tomllib.loads(deploy.APP_PYPROJECT)["tool"]["flwr"]["app"]
    assert app["components"] == generated["components"]
    assert app["fab-include"] == generated["fab-include"] == ["README.md"], (
        "the app that travels holds no code"
    )
    assert set(app["config"]) == set(generated["config"])
    assert "federations" not in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path, write_spec: Any) -> None:
    from launcher.cli import main

    spec = write_spec({**BASE, "rounds": 0}, "fed.yaml")
    assert main(["fed", "simulate", str(spec), "--work-dir", str(tmp_path / "w")]) == 2
    missing = write_spec({**BASE, "server": {"keys": str(tmp_path / "nokeys")}}, "srv.yaml")
    assert main(["fed", "server", str(missing), "--work-dir", str(tmp_path / "w2")]) == 2


def test_default_key_and_site_folders_are_ignored_by_git() -> None:
    from federated.spec import ServerSpec, SiteSpec

    keys, site_dir = ServerSpec().keys, SiteSpec.model_fields["work_dir"].default
    for path in (f"{keys}/ca.key", f"{keys}/sites/site_a.key", f"{site_dir}/round-001/adapter/x"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False).returncode == 0, (
            path
        )


def test_replaced_private_keys_are_owner_only(tmp_path: Path) -> None:
    create_trial_keys(tmp_path, ["site_a"])
    key = tmp_path / "sites" / "site_a.key"
    key.chmod(0o644)
    create_trial_keys(tmp_path, ["site_a"], force=True)
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600


def test_personalised_tensors_stay_at_each_site_and_the_server_never_averages_them(
    write_spec: Any, tmp_path: Path
) -> None:
    from safetensors.numpy import save_file

    from federated.task import personalised

    spec = fed_spec(write_spec, sites={}, min_sites=1, local={"steps": 2, "keep_local": ["lora_B"]})
    reference = adapter(0)
    b_key = "m.q.lora_B.weight"
    replies = [reply("s0", {k: v + 1.0 for k, v in reference.items()}, 10)]  # sends a B anyway
    replies.append(reply("s1", {k: v + 0.5 for k, v in reference.items() if k != b_key}, 10))
    accepted, rejected = screen(replies, reference, spec)
    assert not rejected
    for message in accepted:
        np.testing.assert_array_equal(from_record(message.content["arrays"])[b_key], reference[b_key])

    order = RoundOrder.from_config({**round_config(spec, 3), "server-round": 3})
    assert (
        order.keep_local == ["lora_B"] and order.withheld(b_key) and not order.withheld("m.q.lora_A.weight")
    )
    own = {k: v * 7.0 for k, v in reference.items()}
    (tmp_path / "round-001" / "adapter").mkdir(parents=True)
    save_file(own, str(tmp_path / "round-001" / "adapter" / "adapter_model.safetensors"))
    start = personalised(reference, tmp_path, order)  # round 2 was missed: round 1's own B is used
    np.testing.assert_array_equal(start[b_key], own[b_key])
    np.testing.assert_array_equal(start["m.q.lora_A.weight"], reference["m.q.lora_A.weight"])
    with pytest.raises(SpecError, match="keep_local"):
        fed_spec(write_spec, local={"keep_local": ["lora_B"]}, strategy={"name": "lora_product"})
