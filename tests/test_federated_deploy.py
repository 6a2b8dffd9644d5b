"""Deployment on loopback: a SuperLink and SuperNodes as separate processes, TLS and node authentication.

One scenario, in the order a coordinator would live it: a SuperNode whose key was never enrolled is
refused; a site is killed mid-round and the round completes without it (min_sites = 1); the site is
revoked and its reconnection refused; the server crashes and, restarted, resumes after the last
committed round instead of starting over. And one round of seven sites: each site's policy refuses a
round that falls short of it, and an enrolled site that answers under another site's name is
rejected. (Each federation costs a minute of process start-up on 2 cores: scenarios share them.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from federated.ops.deploy import CONNECTION, flower_env, flwr_cli
from federated.ops.keys import create_trial_keys, write_node_key
from federated.rounds import RoundStore
from federated.sites import site_names
from launcher.backends.commands import free_port
from launcher.processes import process_tree, stop_processes
from tests.conftest import QUIET_ENV, REPO, flotilla, tiny_job, wait_for

Start = Callable[..., subprocess.Popen[str]]
#: Rounds of the dropout, revocation and restart scenario.
ROUNDS = 4


def kill_tree(process: subprocess.Popen[str], sig: str = "kill") -> None:
    """Stop a process started by this test and everything it started, by PID."""
    stop_processes(process_tree(process.pid), timeout=30, kill=sig == "kill")
    process.wait(timeout=30)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start ``flotilla`` commands in the background; every one is stopped at teardown."""
    started: list[subprocess.Popen[str]] = []

    def run(*args: str, log: str) -> subprocess.Popen[str]:
        handle = (tmp_path / log).open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", *args],
            cwd=tmp_path,
            env={**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO)},
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(process)
        return process

    yield run
    every = [pid for process in started for pid in process_tree(process.pid)]
    stop_processes(every, timeout=30)  # all at once: each SuperNode takes seconds to end
    for process in started:
        process.wait(timeout=30)


def write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def federation_file(tmp_path: Path, model: Path, port: int, name: str, **changes: Any) -> Path:
    """A federation of two sites on the SuperLink at 127.0.0.1:``port`` with the keys in tmp_path/keys."""
    spec = {
        "name": name,
        "model": {"path": str(model)},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "min_sites": 1,
        "start_sites": 2,
        "round_timeout": 240,
        "local": {"steps": 2},
        "server": {"host": "127.0.0.1", "port": port, "keys": str(tmp_path / "keys")},
        "output": str(tmp_path / "out"),
        **changes,
    }
    return write(tmp_path / "fed.yaml", spec)


def site_file(
    tmp_path: Path,
    port: int,
    ca_cert: Path,
    name: str,
    key: Path,
    job: Path,
    declared: str = "",
    policy: dict[str, Any] | None = None,
) -> Path:
    """The site spec of SuperNode ``name`` (its key, job, work dir and policy), declaring
    ``declared`` (default: its name)."""
    spec: dict[str, Any] = {
        "site": declared or name,
        "job": str(job),
        "superlink": f"127.0.0.1:{port}",
        "ca_cert": str(ca_cert),
        "private_key": str(key),
        "work_dir": str(tmp_path / f"work-{name}"),
    }
    if policy is not None:
        spec["policy"] = policy
    return write(tmp_path / f"{name}.site.yaml", spec)


def shared_job(tmp_path: Path, model: Path) -> Path:
    """One small local job both sites train."""
    return write(
        tmp_path / "job.yaml",
        tiny_job(model, tmp_path, data={"max_train_rows": 32, "max_validation_rows": 8}),
    )


def wait_enrolled(log: Path, sites: int = 2) -> None:
    wait_for(lambda: f"{sites} site key(s) enrolled" in log.read_text(), 120, "the SuperLink")


def test_tls_node_auth_dropout_revocation_and_server_restart(
    tiny_llama: Path, tmp_path: Path, start: Start
) -> None:
    """A never-enrolled key is refused; site_b drops out mid-round 1 and round 1 completes without
    it; the coordinator revokes site_b while the SuperLink runs, and its reconnection is refused; the
    server crashes in round 2 and, restarted, resumes after the last committed round."""
    keys = create_trial_keys(tmp_path / "keys", ["site_a", "site_b"])
    rogue_key, _ = write_node_key(tmp_path / "rogue")
    port = free_port()
    for site in ("site_a", "site_b"):
        job = tiny_job(tiny_llama, tmp_path, name=site, data={"max_train_rows": 32, "max_validation_rows": 8})
        write(tmp_path / f"{site}.job.yaml", job)
    # Four rounds: site_a alone may commit a round or two while site_b is revoked; the crash falls
    # in a later one, and the resume is checked from wherever the round store says it was.
    fed = federation_file(tmp_path, tiny_llama, port, "deployed", rounds=ROUNDS, seed=7)

    def site_spec(name: str, key: Path) -> Path:
        job = tmp_path / ("site_a.job.yaml" if name == "rogue" else f"{name}.job.yaml")
        return site_file(tmp_path, port, keys.ca_cert, name, key, job)

    store = RoundStore(tmp_path / "out" / "deployed")
    server = start("fed", "server", str(fed), log="server-1.log")
    wait_enrolled(tmp_path / "server-1.log")
    assert "https://127.0.0.1" in (store.work_dir / "superlink.log").read_text()
    site_a = start("fed", "site", str(site_spec("site_a", keys.site_keys["site_a"][0])), log="site_a.log")
    site_b = start("fed", "site", str(site_spec("site_b", keys.site_keys["site_b"][0])), log="site_b.log")
    rogue = start("fed", "site", str(site_spec("rogue", rogue_key)), log="rogue.log")

    assert rogue.wait(timeout=120) == 2
    assert "refused this SuperNode" in (tmp_path / "rogue.log").read_text()

    wait_for(lambda: (tmp_path / "work-site_b" / "round-001").is_dir(), 300, "site_b to start round 1")
    kill_tree(site_b)
    wait_for(lambda: store.last_completed() == 1, 400, "round 1 to complete without site_b")
    round_1 = store.rows()[1]
    statuses = {s["site"]: s["status"] for s in round_1["sites"]}
    assert statuses == {"site_a": "accepted", "site_b": "error"}, round_1["sites"]

    (node_b,) = [node for node, name in site_names(store.work_dir).items() if name == "site_b"]
    assert superlink_nodes(store.work_dir)[node_b] != "unregistered"
    revoked = flotilla("fed", "revoke", str(fed), "--site", "site_b")
    assert revoked.returncode == 0, revoked.stderr
    assert "unregistered; its key is refused from its next connection" in revoked.stdout
    assert superlink_nodes(store.work_dir)[node_b] == "unregistered"
    again = start(
        "fed", "site", str(site_spec("site_b", keys.site_keys["site_b"][0])), log="site_b-again.log"
    )
    assert again.wait(timeout=120) == 2
    assert "refused this SuperNode" in (tmp_path / "site_b-again.log").read_text()

    kill_tree(server)  # the coordinator crashes mid-federation
    committed = store.last_completed()
    assert 1 <= committed < ROUNDS, committed
    restarted_at = time.time()
    trained = (tmp_path / "work-site_a" / f"round-{committed:03d}" / "summary.json").stat().st_mtime
    server = start("fed", "server", str(fed), log="server-2.log")
    assert server.wait(timeout=400) == 0, (tmp_path / "server-2.log").read_text()[-3000:]
    log = (tmp_path / "server-2.log").read_text()
    assert f"resuming after round {committed}" in log
    assert "1 site key(s) enrolled" in log  # the revoked key is never enrolled again
    assert [row["round"] for row in store.rows()] == list(range(ROUNDS + 1))
    for later in range(2, ROUNDS + 1):
        statuses = {s["site"]: s["status"] for s in store.rows()[later]["sites"]}
        assert statuses["site_a"] == "accepted" and statuses.get("site_b") != "accepted", statuses
    assert (tmp_path / "work-site_a" / f"round-{committed:03d}" / "summary.json").stat().st_mtime == trained
    resumed = tmp_path / "work-site_a" / f"round-{committed + 1:03d}" / "summary.json"
    assert resumed.stat().st_mtime > restarted_at
    assert site_a.poll() is None, "the site keeps serving across the server restart"


def superlink_nodes(work_dir: Path) -> dict[int, str]:
    """Node id -> status as the SuperLink itself lists them (``flwr supernode list``, as the coordinator)."""
    listed = flwr_cli(
        ["supernode", "list", CONNECTION, "--format", "json"], flower_env(work_dir / "flwr-home")
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return {int(n["node-id"]): n["status"] for n in json.loads(listed.stdout)["nodes"]}


def test_site_policies_refuse_a_round_that_falls_short_and_an_impersonator_is_rejected(
    tiny_llama: Path, tmp_path: Path, start: Start
) -> None:
    """Seven enrolled sites, one round of a plain FedAvg request (no SecAgg+, no DP): each site whose
    policy the request does not meet refuses before training, in its own record and in the server's
    round report; the sites whose policy it meets (pins included) are aggregated. And mallory's
    SuperNode (mallory's enrolled key) answers as 'plain': rejected, both names logged, its update
    never averaged in."""
    job = shared_job(tmp_path, tiny_llama)
    pins = fingerprints(tmp_path, job)
    policies: dict[str, dict[str, Any]] = {
        "plain": {},
        "pinned": {"min_sites": 7, "fingerprints": pins},
        "secagg": {"require_secagg": True},
        "clipping": {"max_clipping_norm": 1.0},
        "crowd": {"min_sites": 8},
        "model_pin": {"fingerprints": {**pins, "base_model": "0" * 64}},
    }
    enrolled = [*policies, "mallory"]
    keys = create_trial_keys(tmp_path / "keys", enrolled)
    port = free_port()
    fed = federation_file(tmp_path, tiny_llama, port, "policies", rounds=1, start_sites=len(enrolled))
    server = start("fed", "server", str(fed), log="server.log")
    wait_enrolled(tmp_path / "server.log", len(enrolled))
    for name, policy in policies.items():
        spec = site_file(tmp_path, port, keys.ca_cert, name, keys.site_keys[name][0], job, policy=policy)
        start("fed", "site", str(spec), log=f"{name}.log")
    mallory = site_file(tmp_path, port, keys.ca_cert, "mallory", keys.site_keys["mallory"][0], job, "plain")
    start("fed", "site", str(mallory), log="mallory.log")
    assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]

    store = RoundStore(tmp_path / "out" / "policies")
    sites = {s["site"]: s for s in store.rows()[1]["sites"]}
    assert {name: s["status"] for name, s in sites.items()} == {
        "plain": "accepted",
        "pinned": "accepted",
        "secagg": "refused",
        "clipping": "refused",
        "crowd": "refused",
        "model_pin": "refused",
        "mallory": "rejected",
    }
    assert "enrolled as 'mallory'" in sites["mallory"]["reason"]
    assert "claims to be 'plain'" in sites["mallory"]["reason"]
    server_log = (store.work_dir / "serverapp.log").read_text()
    assert "enrolled as 'mallory' but its reply claims to be 'plain'" in server_log
    expected = {
        "secagg": "the policy requires SecAgg+ but the round is not secure-aggregated",
        "clipping": "client-side clipping at most 1 but the round asks for no client-side clipping",
        "crowd": "the round has 7 site(s), fewer than the policy's min_sites 8",
        "model_pin": "the server announces sha256",
    }
    for name, reason in expected.items():
        assert reason in sites[name]["reason"], sites[name]
        assert f"site {name} refuses the round" in server_log
        (refusal,) = [
            json.loads(line) for line in (tmp_path / f"work-{name}" / "refused-rounds.jsonl").open()
        ]
        assert reason in refusal["reason"]  # the site's own record
        assert f"site {name} refuses the round" in (tmp_path / f"work-{name}" / "supernode.log").read_text()
        assert not (tmp_path / f"work-{name}" / "round-001").exists(), "a refusing site trains nothing"
    assert "this site's base model" in sites["model_pin"]["reason"]  # its own copy is checked too
    assert "code" not in sites["model_pin"]["reason"]  # the code pin holds, on both sides
    global_1 = load_file(str(store.adapter_dir(1) / "adapter_model.safetensors"))
    trained = [
        load_file(str(tmp_path / f"work-{name}" / "round-001" / "adapter" / "adapter_model.safetensors"))
        for name in ("plain", "pinned")
    ]
    for key, value in global_1.items():  # equal weights: the same data at both sites; mallory's is out
        np.testing.assert_allclose(value, (trained[0][key] + trained[1][key]) / 2, atol=1e-5)


def fingerprints(tmp_path: Path, job: Path) -> dict[str, str]:
    """The pins ``flotilla fed fingerprint`` prints for a site training ``job`` with this checkout."""
    spec = write(tmp_path / "probe.site.yaml", {"site": "probe", "job": str(job), "insecure": True})
    printed = flotilla("fed", "fingerprint", str(spec))
    assert printed.returncode == 0, printed.stderr
    return yaml.safe_load(printed.stdout)["policy"]["fingerprints"]
