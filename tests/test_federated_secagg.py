"""SecAgg+ (Flower's legacy workflow API): the server only ever sees the sum of the sites' adapters.

Every reply that leaves a site is recorded at the site's boundary (an outermost mod). The test shows
that no reply carries adapter values (the arrays are emptied, the update travels masked), that a
masked vector is unrelated to the adapter it hides, and that unmasking the sum gives exactly the
examples-weighted mean of the sites' adapters.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import Context, Message
from safetensors.numpy import load_file

from federated.ops.simulation import simulate
from federated.rounds import RoundStore
from federated.spec import load_federation
from federated.strategy.aggregation import Update, fedavg
from tests.conftest import tiny_job

SITES = {"site_a": "mixture_math.jsonl", "site_b": "mixture_capitals.jsonl", "site_c": "instructions.jsonl"}
ROWS = {"site_a": 24, "site_b": 40, "site_c": 32}


def record_outgoing(out_dir: Path, msg: Message, context: Context, call_next: Any) -> Message:
    """Keep what this site sends back, exactly as it leaves (outside SecAgg+'s masking)."""
    # SecAgg+'s mod pops the stage from the incoming configs: read it before passing the message on
    stage = msg.content.config_records.get("secaggplus_configs", {}).get("stage")
    reply = call_next(msg, context)
    configs = reply.content.config_records.get("secaggplus_configs", {})
    site = context.node_config["partition-id"]
    record = {
        "stage": stage,
        "array_bytes": sum(len(a.data) for r in reply.content.array_records.values() for a in r.values()),
        "records": sorted(
            [*reply.content.array_records, *reply.content.config_records, *reply.content.metric_records]
        ),
    }
    with (out_dir / f"sent-{site}.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    if "masked_params" in configs:
        masked = [np.load(io.BytesIO(b), allow_pickle=False) for b in configs["masked_params"]]
        np.savez(out_dir / f"masked-{site}.npz", *masked)
    return reply


@pytest.fixture(scope="module")
def secagg_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RoundStore, Path]:
    root = tmp_path_factory.mktemp("secagg")
    sites = {}
    for name, data in SITES.items():
        job = tiny_job(
            tiny_llama,
            root,
            name=name,
            data={
                "train": str(Path(__file__).parent.parent / "configs" / "data" / data),
                "max_train_rows": ROWS[name],
                "validation_ratio": 0.0,
                "validation": [],
            },
        )
        job["data"].pop("max_validation_rows")
        (root / f"{name}.yaml").write_text(yaml.safe_dump(job))
        sites[name] = str(root / f"{name}.yaml")
    spec = {
        "name": "secagg",
        "seed": 7,
        "model": {"path": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "rounds": 1,
        "min_sites": 3,
        "local": {"steps": 2},
        "privacy": {"secagg": {"max_weight": 100, "num_shares": 3, "reconstruction_threshold": 2}},
        "sites": sites,
        "output": str(root / "out"),
    }
    (root / "fed.yaml").write_text(yaml.safe_dump(spec))
    fed = load_federation(root / "fed.yaml")
    sent = root / "sent"
    sent.mkdir()
    simulate(fed, root / "out" / "secagg", extra_mods=[functools.partial(record_outgoing, sent)])
    return RoundStore(root / "out" / "secagg"), sent


def test_no_site_reply_carries_adapter_values(secagg_run: tuple[RoundStore, Path]) -> None:
    _, sent = secagg_run
    for site in range(3):
        replies = [json.loads(line) for line in (sent / f"sent-{site}.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in replies] == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
        assert all(r["array_bytes"] == 0 for r in replies), replies


def test_a_masked_vector_is_unrelated_to_the_adapter_it_hides(secagg_run: tuple[RoundStore, Path]) -> None:
    store, sent = secagg_run
    for site, name in enumerate(SITES):
        masked = np.load(sent / f"masked-{site}.npz")
        flat_masked = np.concatenate(
            [masked[k].ravel() for k in sorted(masked.files, key=lambda f: int(f.split("_")[1]))][1:]
        )
        adapter = load_file(
            str(store.work_dir / "sites" / name / "round-001" / "adapter" / "adapter_model.safetensors")
        )
        global_keys = list(load_file(str(store.adapter_dir(0) / "adapter_model.safetensors")))
        true = np.concatenate([adapter[k].ravel() for k in global_keys])
        assert flat_masked.shape == true.shape
        correlation = np.corrcoef(flat_masked.astype(np.float64), true.astype(np.float64))[0, 1]
        assert abs(correlation) < 0.1, correlation


def test_the_server_unmasks_only_the_weighted_mean(secagg_run: tuple[RoundStore, Path]) -> None:
    store, _ = secagg_run
    row = store.rows()[1]
    assert row["secagg"] and sorted(s["site"] for s in row["sites"] if s["status"] == "accepted") == sorted(
        SITES
    )
    updates = [
        Update(
            name,
            load_file(
                str(store.work_dir / "sites" / name / "round-001" / "adapter" / "adapter_model.safetensors")
            ),
            ROWS[name],
        )
        for name in SITES
    ]
    merged = load_file(str(store.adapter_dir(1) / "adapter_model.safetensors"))
    for key, value in fedavg(updates).items():
        np.testing.assert_allclose(merged[key], value, atol=1e-4)
