"""The Ray backend on a real Ray head (127.0.0.1, 2 CPUs, its own temp dir), through the CLI.

One head serves the module; each test leaves it idle. Ray start-up is slow on 2 cores, so the jobs
are the tiny Llama for a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.backends.commands import free_port
from launcher.backends.ray.cluster import RayHead
from launcher.errors import BAD_INPUT_EXIT_CODE, REQUEUE_EXIT_CODE, RUNTIME_FAILURE_EXIT_CODE
from launcher.processes import process_tree
from tests.conftest import (
    DATA,
    assert_adapter_reloads_equal,
    flotilla,
    import_or_unavailable,
    loss_log,
    losses,
    only_run_dir,
    processes_left,
    start_flotilla,
    tiny_job,
    wait_for,
)

import_or_unavailable("ray.train")

BAD_DATA = DATA / "bad" / "bad_json.jsonl"
#: Rich wraps the CLI's messages at 80 columns when captured; keep each on one line.
WIDE = {"COLUMNS": "1000"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return flotilla(*args, env={**WIDE, **(env or {})})


def ray_job(model: Path, tmp_path: Path, address: str, workers: int = 2, **sections: Any) -> dict[str, Any]:
    """The tiny job on the ray backend at ``address``."""
    spec = tiny_job(model, tmp_path, resources={"backend": "ray", "workers": workers}, **sections)
    spec["ray"] = {"address": address, "max_failures": 2, **spec.get("ray", {})}
    return spec


#: The job of the uninterrupted run and of the one whose worker is killed: the same losses expected.
RESTART_TRAIN = {"max_steps": 12, "save_steps": 3}


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    stderr: str


@pytest.fixture(scope="module")
def uninterrupted(
    ray_head: RayHead, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> FinishedRun:
    """Two workers train the job to its end without interruption."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(ray_job(tiny_llama, tmp_path, ray_head.address, train=RESTART_TRAIN)))
    result = cli("run", str(spec))
    assert result.returncode == 0, result.stderr[-4000:]
    return FinishedRun(only_run_dir(tmp_path / "runs"), result.stderr)


def test_two_workers_learn_and_save_a_verified_adapter(uninterrupted: FinishedRun, tiny_llama: Path) -> None:
    run_dir = uninterrupted.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert json.loads((run_dir / "manifest.json").read_text())["world_size"] == 2
    assert "world_rank=1" in uninterrupted.stderr  # Ray Train started two workers in one process group
    snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    assert "checkpoints/checkpoint-12" in snapshot  # Ray tracks the run dir's own checkpoints

    assert_adapter_reloads_equal(tiny_llama, run_dir)


def test_zero2_inside_ray_workers_learns_and_saves_a_verified_adapter(
    ray_head: RayHead, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    """resources.launcher: deepspeed runs the same derived DeepSpeed config in every Ray worker."""
    job = ray_job(tiny_llama, tmp_path, ray_head.address)
    job["resources"].update(launcher="deepspeed", zero={"stage": 2})
    result = cli("run", str(write_spec(job)))
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = only_run_dir(tmp_path / "runs")
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["deepspeed_config"]["zero_optimization"]["stage"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert_adapter_reloads_equal(tiny_llama, run_dir)


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_and_the_losses_match(
    ray_head: RayHead, uninterrupted: FinishedRun, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    from ray.util.state import list_actors

    spec = write_spec(ray_job(tiny_llama, tmp_path, ray_head.address, train=RESTART_TRAIN))
    log = tmp_path / "run.log"
    with log.open("w") as out:
        process = start_flotilla("run", str(spec), env=WIDE, stdout=out, stderr=subprocess.STDOUT)
    try:
        root = tmp_path / "runs" / "tiny"
        wait_for(
            lambda: list(root.glob("*/checkpoints/checkpoint-3/flotilla-checkpoint.json")),
            300,
            "a checkpoint",
        )
        workers = list_actors(
            address=ray_head.dashboard_url,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        )
        assert len(workers) == 2, workers
        os.kill(workers[1].pid, signal.SIGKILL)
        assert process.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    run_dir = only_run_dir(tmp_path / "runs")
    assert "[FailurePolicy] RETRY" in output  # Ray Train restarted the worker group...
    assert "resuming from" in output  # ...and the train core went on from the run's last checkpoint
    steps = [step for step, _ in loss_log(run_dir)]
    assert set(steps) == set(range(1, 13))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12
    expected = losses(uninterrupted.run_dir)
    for step, loss in losses(run_dir).items():  # the resumed run is the uninterrupted one, step by step
        assert loss == pytest.approx(expected[step], abs=1e-5), (step, loss, expected[step])
    assert_adapter_reloads_equal(tiny_llama, run_dir)


def test_submit_as_ray_jobs_poll_read_logs_and_cancel(
    ray_head: RayHead, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    address = ray_head.dashboard_url
    assert address is not None
    short = write_spec(ray_job(tiny_llama, tmp_path / "short", address, workers=1), "short.yaml")
    long = write_spec(
        ray_job(tiny_llama, tmp_path / "long", address, workers=1, train={"max_steps": 5000}), "long.yaml"
    )
    submitted = [cli("submit", str(path)) for path in (short, long)]
    for result in submitted:
        assert result.returncode == 0, result.stderr[-3000:]
    short_id, long_id = (result.stdout.strip() for result in submitted)
    assert short_id.startswith("raysubmit_") and long_id.startswith("raysubmit_")
    short_dir = only_run_dir(tmp_path / "short" / "runs")
    long_dir = only_run_dir(tmp_path / "long" / "runs")
    by_id = {"RAY_ADDRESS": address}

    wait_for(lambda: (long_dir / "metrics.jsonl").is_file(), 300, "the long job to train")
    assert cli("status", long_id, env=by_id).stdout.strip() == "RUNNING"
    cancelled = cli("cancel", str(long_dir))
    assert cancelled.returncode == 0, cancelled.stderr
    wait_for(lambda: cli("status", str(long_dir)).stdout.strip() == "CANCELLED", 60, "the cancel")

    def short_state() -> str | None:
        state = cli("status", str(short_dir)).stdout.strip()
        return state if state in ("SUCCEEDED", "FAILED", "CANCELLED") else None

    assert wait_for(short_state, 300, "the short job") == "SUCCEEDED", cli("logs", str(short_dir)).stdout
    logs = cli("logs", short_id, env=by_id)
    assert logs.returncode == 0
    assert "model: " in logs.stdout and "Reporting training result" in logs.stdout
    summary = json.loads((short_dir / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert not (long_dir / "summary.json").exists()


def test_clear_errors_before_anything_starts(
    ray_head: RayHead, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    result = cli("run", str(write_spec(ray_job(tiny_llama, tmp_path, nobody), "nobody.yaml")))
    assert result.returncode == RUNTIME_FAILURE_EXIT_CODE  # infrastructure, not the spec: may be retried
    assert f"no Ray cluster reachable at ray.address='{nobody}'" in result.stderr

    too_big = write_spec(ray_job(tiny_llama, tmp_path, ray_head.address, workers=3), "big.yaml")
    result = cli("run", str(too_big))
    assert result.returncode == BAD_INPUT_EXIT_CODE
    assert "asks for 3 CPUs and 0 GPUs" in result.stderr and "has 2 CPUs" in result.stderr
    assert "room for 2" in result.stderr

    no_conda = ray_job(
        tiny_llama, tmp_path, ray_head.address, workers=1, ray={"runtime_env": {"conda": "none"}}
    )
    result = cli("run", str(write_spec(no_conda, "conda.yaml")))
    assert result.returncode == BAD_INPUT_EXIT_CODE
    assert "ray.runtime_env could not be set up on the cluster" in result.stderr and "Conda" in result.stderr

    bad_rows = ray_job(tiny_llama, tmp_path, ray_head.address, workers=1, data={"train": str(BAD_DATA)})
    result = cli("run", str(write_spec(bad_rows, "rows.yaml")))
    assert result.returncode == BAD_INPUT_EXIT_CODE, result.stderr[-3000:]
    assert "error:" in result.stderr and "bad_json.jsonl" in result.stderr
    assert "[FailurePolicy] RETRY" not in result.stderr  # bad input is reported, not retried

    result = cli("submit", str(write_spec(ray_job(tiny_llama, tmp_path, "local"), "local.yaml")))
    assert result.returncode == BAD_INPUT_EXIT_CODE and "needs a running Ray cluster" in result.stderr

    bad = ray_job(tiny_llama, tmp_path, "ray://head")
    bad["resources"]["nodes"] = 2
    bad["ray"].update(num_cpus=4, runtime_env={"pipp": ["x"]})
    result = cli("validate", str(write_spec(bad, "bad.yaml")))
    assert result.returncode == BAD_INPUT_EXIT_CODE
    for expected in (
        "resources.nodes",
        "'ray://head' is not a Ray address",
        "ray.num_cpus",
        "ray.runtime_env.pipp",
        "did you mean 'pip'",
    ):
        assert expected in result.stderr, (expected, result.stderr)

    typed = ray_job(tiny_llama, tmp_path, ray_head.address)
    typed["ray"]["runtime_env"] = {"env_vars": {"A": 1}}
    result = cli("validate", str(write_spec(typed, "typed.yaml")))
    assert result.returncode == BAD_INPUT_EXIT_CODE and "env_vars" in result.stderr


def test_local_address_starts_a_private_ray_and_stops_it(
    ray_head: Any, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    """With another Ray cluster on the machine (``ray_head``), the private head's processes look
    up their own cluster, not "multiple active Ray instances" (Ray Train's placement-group cleaner
    asks the state API with no address)."""
    spec = write_spec(ray_job(tiny_llama, tmp_path, "local", workers=1, train={"max_steps": 4}))
    result = cli("run", str(spec))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "multiple active Ray instances" not in result.stdout + result.stderr
    assert json.loads((only_run_dir(tmp_path / "runs") / "summary.json").read_text())["steps"] == 4
    line = next(line for line in result.stderr.splitlines() if line.startswith("Ray is up"))
    port = int(line.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the private head is gone


def test_a_stop_signal_checkpoints_the_workers_and_stops_the_private_ray(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    """SIGTERM to `flotilla run` driving a private Ray: the workers checkpoint and stop, the run
    exits 85, the head is stopped, and no process of the job is left."""
    train = {"max_steps": 400, "save_steps": 1000}
    spec = write_spec(ray_job(tiny_llama, tmp_path, "local", workers=1, train=train))
    log = tmp_path / "run.log"
    with log.open("w") as out:
        process = start_flotilla("run", str(spec), env=WIDE, stdout=out, stderr=subprocess.STDOUT)
    try:
        root = tmp_path / "runs" / "tiny"
        logged = lambda: any('"loss"' in f.read_text() for f in root.glob("*/metrics.jsonl"))  # noqa: E731
        wait_for(lambda: logged() or process.poll() is not None, 300, "the first training loss")
        assert logged(), f"exit {process.returncode} before training:\n{log.read_text()[-4000:]}"
        job = process_tree(process.pid)
        assert len(job) >= 4, job  # the CLI, `ray start`, Ray's daemons, the worker
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=180) == REQUEUE_EXIT_CODE, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    run_dir = only_run_dir(tmp_path / "runs")
    checkpoints = list((run_dir / "checkpoints").glob("checkpoint-*/flotilla-checkpoint.json"))
    assert len(checkpoints) == 1, log.read_text()[-4000:]
    assert not (run_dir / "summary.json").exists()
    left = processes_left(job)
    assert left == [], f"processes of the job left running: {left}"


def test_shipped_ray_config_validates_and_renders_its_ray_job() -> None:
    assert cli("validate", "configs/ray.yaml").returncode == 0
    result = cli("submit", "configs/ray.yaml", "ray.address=http://127.0.0.1:8265", "--dry-run")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["entrypoint"].startswith("python -m launcher.backends.ray ")
    assert job["workers"] == 2 and job["resources_per_worker"] == {"CPU": 1}
