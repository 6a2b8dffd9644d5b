"""Deployment on loopback: a SuperLink and SuperNodes as separate processes, TLS and node authentication.

One scenario, in the order a coordinator would live it: a SuperNode whose key was never enrolled is
refused; a site is killed mid-round and the round completes without it (min_sites = 1); the server
crashes after round 1 and, restarted, resumes at round 2 instead of starting over. And an enrolled
site that answers under another site's name is refused.
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
    for process in started:
        kill_tree(process, "term")


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


def test_tls_node_auth_dropout_and_server_restart(tiny_llama: Path, tmp_path: Path, start: Start) -> None:
    keys = create_trial_keys(tmp_path / "keys", ["site_a", "site_b"])
    rogue_key, _ = write_node_key(tmp_path / "rogue")
    port = free_port()
    for site in ("site_a", "site_b"):
        job = tiny_job(tiny_llama, tmp_path, name=site, data={"max_train_rows": 32, "max_validation_rows": 8})
        write(tmp_path / f"{site}.job.yaml", job)
    fed = federation_file(tmp_path, tiny_llama, port, "deployed", rounds=2, seed=7)

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

    kill_tree(server)  # the coordinator crashes during round 2
    restarted_at = time.time()
    trained_round_1 = (tmp_path / "work-site_a" / "round-001" / "summary.json").stat().st_mtime
    server = start("fed", "server", str(fed), log="server-2.log")
    assert server.wait(timeout=400) == 0, (tmp_path / "server-2.log").read_text()[-3000:]
    log = (tmp_path / "server-2.log").read_text()
    assert "resuming after round 1" in log
    assert [row["round"] for row in store.rows()] == [0, 1, 2]
    assert {s["site"]: s["status"] for s in store.rows()[2]["sites"]}["site_a"] == "accepted"
    assert (tmp_path / "work-site_a" / "round-001" / "summary.json").stat().st_mtime == trained_round_1
    assert (tmp_path / "work-site_a" / "round-002" / "summary.json").stat().st_mtime > restarted_at
    assert site_a.poll() is None, "the site keeps serving across the server restart"


def test_an_enrolled_site_cannot_answer_under_another_sites_name(
    tiny_llama: Path, tmp_path: Path, start: Start
) -> None:
    """site_b's SuperNode (site_b's enrolled key) declares itself site_a: refused, both names logged;
    the real site_a's update is aggregated."""
    keys = create_trial_keys(tmp_path / "keys", ["site_a", "site_b"])
    port = free_port()
    job = shared_job(tmp_path, tiny_llama)
    fed = federation_file(tmp_path, tiny_llama, port, "impersonation", rounds=1)
    server = start("fed", "server", str(fed), log="server.log")
    wait_enrolled(tmp_path / "server.log")
    for key_of in ("site_a", "site_b"):  # site_b's SuperNode declares itself site_a
        spec = site_file(tmp_path, port, keys.ca_cert, key_of, keys.site_keys[key_of][0], job, "site_a")
        start("fed", "site", str(spec), log=f"{key_of}.log")
    assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
    store = RoundStore(tmp_path / "out" / "impersonation")
    sites = {s["site"]: s for s in store.rows()[1]["sites"]}
    assert sites["site_a"]["status"] == "accepted"
    assert sites["site_b"]["status"] == "rejected"
    assert "enrolled as 'site_b'" in sites["site_b"]["reason"]
    assert "claims to be 'site_a'" in sites["site_b"]["reason"]
    log = (store.work_dir / "serverapp.log").read_text()
    assert "enrolled as 'site_b' but its reply claims to be 'site_a'" in log
    global_a = load_file(str(store.adapter_dir(1) / "adapter_model.safetensors"))
    trained_a = load_file(
        str(tmp_path / "work-site_a" / "round-001" / "adapter" / "adapter_model.safetensors")
    )
    for key, value in global_a.items():
        np.testing.assert_allclose(value, trained_a[key], atol=1e-6)  # only site_a's update counts


def superlink_nodes(work_dir: Path) -> dict[int, str]:
    """Node id -> status as the SuperLink itself lists them (``flwr supernode list``, as the coordinator)."""
    listed = flwr_cli(
        ["supernode", "list", CONNECTION, "--format", "json"], flower_env(work_dir / "flwr-home")
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return {int(n["node-id"]): n["status"] for n in json.loads(listed.stdout)["nodes"]}


def test_a_revoked_site_is_refused_when_it_reconnects(tiny_llama: Path, tmp_path: Path, start: Start) -> None:
    keys = create_trial_keys(tmp_path / "keys", ["site_a", "site_b"])
    port = free_port()
    job = shared_job(tmp_path, tiny_llama)
    # Three rounds: the revoked site's reconnection must reach a SuperLink that is still up, and
    # site_a alone can finish a round in seconds; a third round keeps the federation open meanwhile.
    fed = federation_file(tmp_path, tiny_llama, port, "revocation", rounds=3)
    server = start("fed", "server", str(fed), log="server.log")
    wait_enrolled(tmp_path / "server.log")

    def site(name: str, log: str) -> subprocess.Popen[str]:
        spec = site_file(tmp_path, port, keys.ca_cert, name, keys.site_keys[name][0], job)
        return start("fed", "site", str(spec), log=log)

    site("site_a", "site_a.log")
    site_b = site("site_b", "site_b.log")
    store = RoundStore(tmp_path / "out" / "revocation")
    wait_for(lambda: store.last_completed() == 1, 400, "round 1")
    assert {s["site"]: s["status"] for s in store.rows()[1]["sites"]} == {
        "site_a": "accepted",
        "site_b": "accepted",
    }

    (node_b,) = [node for node, name in site_names(store.work_dir).items() if name == "site_b"]
    assert superlink_nodes(store.work_dir)[node_b] == "online"
    revoked = flotilla("fed", "revoke", str(fed), "--site", "site_b")
    assert revoked.returncode == 0, revoked.stderr
    assert "unregistered; its key is refused from its next connection" in revoked.stdout
    assert superlink_nodes(store.work_dir)[node_b] == "unregistered"
    again = site("site_b", "site_b-again.log")  # before the old process is gone: no time lost
    kill_tree(site_b)
    assert again.wait(timeout=120) == 2
    assert "refused this SuperNode" in (tmp_path / "site_b-again.log").read_text()
    assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
    for round_number in (2, 3):
        statuses = {s["site"]: s["status"] for s in store.rows()[round_number]["sites"]}
        assert statuses["site_a"] == "accepted" and statuses.get("site_b") != "accepted", statuses


def test_each_site_policy_refuses_a_round_that_falls_short_and_says_why(
    tiny_llama: Path, tmp_path: Path, start: Start
) -> None:
    """Six enrolled sites, one round of a plain FedAvg request (no SecAgg+, no DP): each site whose
    policy the request does not meet refuses before training, in its own record and in the server's
    round report; the sites whose policy it meets (pins included) are aggregated."""
    job = shared_job(tmp_path, tiny_llama)
    pins = fingerprints(tmp_path, job)
    policies: dict[str, dict[str, Any]] = {
        "plain": {},
        "pinned": {"min_sites": 6, "fingerprints": pins},
        "secagg": {"require_secagg": True},
        "clipping": {"max_clipping_norm": 1.0},
        "crowd": {"min_sites": 7},
        "model_pin": {"fingerprints": {**pins, "base_model": "0" * 64}},
    }
    keys = create_trial_keys(tmp_path / "keys", list(policies))
    port = free_port()
    fed = federation_file(tmp_path, tiny_llama, port, "policies", rounds=1, start_sites=len(policies))
    server = start("fed", "server", str(fed), log="server.log")
    wait_enrolled(tmp_path / "server.log", len(policies))
    for name, policy in policies.items():
        spec = site_file(tmp_path, port, keys.ca_cert, name, keys.site_keys[name][0], job, policy=policy)
        start("fed", "site", str(spec), log=f"{name}.log")
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
    }
    expected = {
        "secagg": "the policy requires SecAgg+ but the round is not secure-aggregated",
        "clipping": "client-side clipping at most 1 but the round asks for no client-side clipping",
        "crowd": "the round has 6 site(s), fewer than the policy's min_sites 7",
        "model_pin": "the server announces sha256",
    }
    server_log = (store.work_dir / "serverapp.log").read_text()
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
    for key, value in global_1.items():  # equal weights: the same data at both sites
        np.testing.assert_allclose(value, (trained[0][key] + trained[1][key]) / 2, atol=1e-5)


def fingerprints(tmp_path: Path, job: Path) -> dict[str, str]:
    """The pins ``flotilla fed fingerprint`` prints for a site training ``job`` with this checkout."""
    spec = write(tmp_path / "probe.site.yaml", {"site": "probe", "job": str(job), "insecure": True})
    printed = flotilla("fed", "fingerprint", str(spec))
    assert printed.returncode == 0, printed.stderr
    return yaml.safe_load(printed.stdout)["policy"]["fingerprints"]
