"""A real federated run (Flower simulation engine, MiniLM sentiment, 3 non-IID sites + 1 attacker).

One simulation is shared by the tests of this module: the global adapter learns, only adapter arrays
travel, and the attacker's poisoned updates (NaN, huge norm, wrong shape) are rejected and never
averaged in. (Federated against local-only quality is tested on real label-skewed data in
test_federated_quality.py: on these synthetic sites every model reaches accuracy 1.0.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from safetensors.numpy import load_file

from federated.adapters import from_record, to_record
from federated.ops.simulation import simulate
from federated.rounds import RoundStore
from federated.spec import load_federation
from federated.strategy.aggregation import Update, fedavg
from launcher.errors import REQUEUE_EXIT_CODE
from launcher.processes import process_tree
from tests.conftest import REPO, processes_left, start_flotilla, wait_for

ROUNDS, LOCAL_STEPS = 3, 6
EXPERIMENT = f"federation-{uuid.uuid4().hex[:8]}"
HONEST = ("site_a", "site_b", "site_c")


def attacker_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 3 never trains: it answers every round with a poisoned copy of the global adapter."""
    if int(context.node_config["partition-id"]) != 3:
        return call_next(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    arrays = {k: v.copy() for k, v in from_record(msg.content["arrays"]).items()}
    b_key = next(k for k in arrays if ".lora_B." in k)
    if server_round == 1:
        arrays[b_key][0, 0] = np.nan
    elif server_round == 2:
        arrays = {k: v + 50.0 for k, v in arrays.items()}
    else:
        arrays[b_key] = np.zeros((arrays[b_key].shape[0], arrays[b_key].shape[1] + 1), np.float32)
    content = RecordDict(
        {
            "arrays": to_record(arrays),
            "metrics": MetricRecord({"num-examples": 100000}),
            "site": ConfigRecord({"name": "attacker"}),
        }
    )
    return Message(content, reply_to=msg)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> RoundStore:
    out = tmp_path_factory.mktemp("fed")
    fed = load_federation(
        REPO / "configs" / "federated.yaml",
        [
            f"rounds={ROUNDS}",
            f"local.steps={LOCAL_STEPS}",
            "min_sites=3",
            f"sites.site_d={REPO / 'configs' / 'federated' / 'site_c.yaml'}",
            f"output={out}",
            "tracking.report_to=[tensorboard, mlflow]",
            f"tracking.mlflow_uri={mlflow_server}",
            f"tracking.experiment={EXPERIMENT}",
        ],
    )
    simulate(fed, out / fed.name, extra_mods=[attacker_mod])
    return RoundStore(out / fed.name)


def site_adapter(store: RoundStore, site: str, server_round: int) -> dict[str, np.ndarray]:
    path = (
        store.work_dir
        / "sites"
        / site
        / f"round-{server_round:03d}"
        / "adapter"
        / "adapter_model.safetensors"
    )
    return load_file(str(path))


def test_the_global_adapter_learns_round_after_round(federation: RoundStore) -> None:
    rows = federation.rows()
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    losses = [r["server_eval"]["eval_loss"] for r in rows]
    assert losses[-1] < losses[1] < losses[0], losses
    for row in rows[1:]:
        accepted = {s["site"] for s in row["sites"] if s["status"] == "accepted"}
        assert accepted == set(HONEST)
        for site in row["sites"]:
            if site["status"] == "accepted":
                assert {"num-examples", "eval_loss", "global-eval_loss", "eval_accuracy"} <= set(
                    site["metrics"]
                )
    from peft import PeftModel

    from launcher.model.load import load_model
    from launcher.spec.models import ModelSpec

    base = load_model(ModelSpec(path="minilm-l6", task="sequence_classification"), ["negative", "positive"])
    PeftModel.from_pretrained(base, federation.adapter_dir(ROUNDS))  # every round is a PEFT folder


def test_only_adapter_arrays_travel(federation: RoundStore) -> None:
    global_keys = set(load_file(str(federation.adapter_dir(0) / "adapter_model.safetensors")))
    adapter_bytes = sum(
        v.nbytes for v in load_file(str(federation.adapter_dir(0) / "adapter_model.safetensors")).values()
    )
    row = federation.rows()[1]
    for server_round in range(1, ROUNDS + 1):
        payload = json.loads((federation.work_dir / "payload" / f"round-{server_round:03d}.json").read_text())
        for site in HONEST:
            sent = payload[site]
            assert set(sent["arrays"]) == {"arrays"}
            keys = set(sent["arrays"]["arrays"])
            assert keys == global_keys
            assert all(".lora_A." in k or ".lora_B." in k or ".classifier." in k for k in keys)
            # the arrays' own bytes plus a small header each (dtype and shape), nothing else
            assert sum(a["bytes"] for a in sent["arrays"]["arrays"].values()) < adapter_bytes * 1.05
            assert sent["configs"] == {"site": {"name": {"type": "str"}}}
            assert all(
                k.replace("-", "_").replace(".", "_").isidentifier() for k in sent["metrics"]["metrics"]
            )
    honest = [s for s in row["sites"] if s["site"] in HONEST]
    assert all(s["bytes_up"] / row["full_weight_bytes"] < 0.01 for s in honest)


def test_poisoned_updates_are_rejected_and_never_averaged_in(federation: RoundStore) -> None:
    expected_reason = {1: "NaN or Inf", 2: "exceeds 10 x median norm", 3: "has shape"}
    for row in federation.rows()[1:]:
        attacker = next(s for s in row["sites"] if s["site"] == "attacker")
        assert attacker["status"] == "rejected"
        assert expected_reason[row["round"]] in attacker["reason"], attacker["reason"]
        honest = [Update(s, site_adapter(federation, s, row["round"]), 135) for s in HONEST]
        merged = load_file(str(federation.adapter_dir(row["round"]) / "adapter_model.safetensors"))
        for key, value in fedavg(honest).items():
            np.testing.assert_allclose(merged[key], value, rtol=1e-5, atol=1e-6)


def test_the_federation_logs_one_tracker_run_with_global_and_per_site_metrics_per_round(
    federation: RoundStore, mlflow_server: str
) -> None:
    """One MLflow run (and one TensorBoard log) for the server: the global adapter's eval loss at
    every round, each honest site's own metrics at every round it was accepted, nothing of the
    attacker, whose every update was rejected."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = federation.rows()
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["rounds"] == str(ROUNDS)
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "server/eval_loss")
    )
    assert history == [(r["round"], pytest.approx(r["server_eval"]["eval_loss"])) for r in rows]
    for site in HONEST:
        own = sorted(
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"site/{site}/eval_loss")
        )
        expected = [
            (r["round"], pytest.approx(s["metrics"]["eval_loss"]))
            for r in rows[1:]
            for s in r["sites"]
            if s["site"] == site
        ]
        assert len(own) == ROUNDS and own == expected, site
    assert not [k for k in run.data.metrics if k.startswith("site/attacker/")]
    assert {"rounds.jsonl", f"round-{ROUNDS:03d}"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    events = EventAccumulator(str(federation.work_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("server/eval_loss")] == list(range(ROUNDS + 1))


def test_the_report_command_prints_the_round_tables(
    federation: RoundStore, capsys: pytest.CaptureFixture[str]
) -> None:
    from launcher.cli import main

    assert main(["fed", "report", str(federation.work_dir)]) == 0
    printed = capsys.readouterr().out
    assert "attacker" in printed and "rejected" in printed and "global adapter per round" in printed


def test_a_stop_signal_ends_the_simulation_with_its_ray_and_leaves_no_process(tmp_path: Path) -> None:
    """SIGTERM to `flotilla fed simulate` mid-round: exit 85, Ray's daemons and actors stopped, no
    process of the simulation left; the same command then resumes the round and finishes (exit 0)."""
    log = tmp_path / "simulate.log"
    command = (
        "fed",
        "simulate",
        str(REPO / "configs" / "federated.yaml"),
        "rounds=1",
        "local.steps=2",
        f"output={tmp_path}",
    )
    process = start_flotilla(*command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    sites = tmp_path / "fed-sentiment" / "sites"
    wait_for(lambda: list(sites.glob("*/round-001/plan.json")), 300, "a site's first round")
    job = process_tree(process.pid)
    assert len(job) >= 3, job  # the CLI, Ray's daemons, the sites' actors
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == REQUEUE_EXIT_CODE, log.read_text()[-3000:]
    assert "flotilla fed simulate" in " ".join(log.read_text().split())  # how to resume
    left = processes_left(job)
    assert left == [], f"processes of the simulation left running: {left}"

    resumed = tmp_path / "resumed.log"
    process = start_flotilla(*command, stdout=resumed.open("w"), stderr=subprocess.STDOUT)
    assert process.wait(timeout=300) == 0, resumed.read_text()[-3000:]
    assert RoundStore(tmp_path / "fed-sentiment").last_completed() == 1
    assert "simulation finished" in resumed.read_text()


def test_client_sampling_trains_the_asked_number_of_sites_each_round(tmp_path: Path) -> None:
    """``sites_per_round: 2`` of 3: every round sends to and aggregates exactly 2 sites, and a site
    left out of a round trains nothing in it."""
    fed = load_federation(
        REPO / "configs" / "federated.yaml",
        ["rounds=3", "local.steps=1", "min_sites=2", "sites_per_round=2", f"output={tmp_path}"],
    )
    simulate(fed, tmp_path / fed.name)
    store = RoundStore(tmp_path / fed.name)
    for row in store.rows()[1:]:
        trained = {s["site"] for s in row["sites"] if s["status"] == "accepted"}
        assert len(row["sites"]) == 2 and len(trained) == 2, row["sites"]
        for site in set(HONEST) - trained:
            assert not (store.work_dir / "sites" / site / f"round-{row['round']:03d}").exists()
