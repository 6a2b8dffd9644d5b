"""The Slurm backend end to end on a real 2-node Slurm (``slurm_cluster``): the generated sbatch
script, a 2-node training run, status/logs/cancel, and preemption → checkpoint → requeue → exact
resume, all through the ``flotilla`` CLI.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    REPO,
    assert_adapter_reloads_equal,
    flotilla,
    import_or_unavailable,
    losses,
    tiny_job,
)
from tests.slurm_cluster import SlurmCluster

STEPS = 48  # enough that three interruptions land before the end on a fast machine (16 raced: the third came after the last step)
TIMEOUT = 300.0


@dataclass
class Submitted:
    """A job submitted through ``flotilla submit``."""

    job_id: str
    run_dir: Path
    env: dict[str, str]
    seen_states: set[str] = field(default_factory=set)


def slurm_job(model: Path, root: Path, **slurm: Any) -> dict[str, Any]:
    """The tiny LoRA job on 2 nodes × 1 process; the same training in every test."""
    return tiny_job(
        model,
        root,
        resources={"backend": "slurm", "nodes": 2, "processes_per_node": 1},
        train={"max_steps": STEPS, "logging_steps": 1},
        slurm={"time": "00:15:00", "signal_grace_seconds": 60, **slurm},
    )


def write(spec: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def submit(cluster: SlurmCluster, spec: dict[str, Any], root: Path) -> Submitted:
    result = flotilla("submit", str(write(spec, root / "job.yaml")), env=cluster.env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = result.stdout.strip().splitlines()[-1]
    (run_dir,) = (root / "runs" / "tiny").iterdir()
    assert json.loads((run_dir / "job.json").read_text())["job_id"] == job_id
    return Submitted(job_id, run_dir, cluster.env)


def status(job: Submitted, target: str | None = None) -> str:
    result = flotilla("status", target or str(job.run_dir), env=job.env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    state = result.stdout.strip()
    job.seen_states.add(state)
    return state


def wait_for_state(job: Submitted, wanted: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while (state := status(job)) != wanted:
        assert state not in {"SUCCEEDED", "FAILED", "CANCELLED"}, f"job ended {state}, wanted {wanted}"
        assert time.monotonic() < deadline, f"job still {state} after {timeout}s"
        time.sleep(1.0)


def loss_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


def wait_for_new_step(run_dir: Path, seen: int, timeout: float = TIMEOUT) -> int:
    """Wait until training logs a step beyond the first ``seen`` loss records; return the new count."""
    deadline = time.monotonic() + timeout
    while len(records := loss_records(run_dir)) <= seen:
        assert time.monotonic() < deadline, f"no new training step in {run_dir} after {timeout}s"
        time.sleep(0.1)
    return len(records)


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "slurm-events.jsonl").read_text().splitlines()]


def log_text(job: Submitted, *extra: str) -> str:
    result = flotilla("logs", *extra, env=job.env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def reference(
    slurm_cluster: SlurmCluster, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Submitted:
    """One uninterrupted 2-node run: the losses every interrupted run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    job = submit(slurm_cluster, slurm_job(tiny_llama, root), root)
    wait_for_state(job, "SUCCEEDED")
    return job


def test_dry_run_prints_the_sbatch_script(tiny_llama: Path, tmp_path: Path) -> None:
    spec = slurm_job(tiny_llama, tmp_path, partition="gpu", account="proj", extra_sbatch=["--exclusive"])
    spec["resources"]["master_port"] = 29512
    result = flotilla("submit", str(write(spec, tmp_path / "job.yaml")), "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    script = result.stdout
    lines = script.splitlines()
    for expected in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --time=00:15:00",
        "#SBATCH --signal=B:USR1@60",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --exclusive",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        "MASTER_PORT=29512",
    ):
        assert expected in lines, expected
    assert any(line.startswith("#SBATCH --output=") and line.endswith("/slurm-%j.out") for line in lines)
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0

    # The node rank reaches each task unexpanded (single quotes), so every node reads its own
    # SLURM_NODEID instead of the batch shell's 0.
    start = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    words = shlex.split(" ".join(line.removesuffix("\\") for line in lines[start : end + 1]))
    task = words[words.index("-c") + 1]
    assert '--node_rank="$SLURM_NODEID"' in task and '--nnodes="$SLURM_NNODES"' in task
    assert "--nproc_per_node=1" in task and "-m launcher.train" in task
    assert "SIGUSR1" in task  # torchrun passes USR1 on instead of dying of it
    assert 'kill -USR1 "$STEP"' in script  # the batch shell forwards the time-limit signal
    assert "export RUN_DIR=" in script and "export MASTER_ADDR MASTER_PORT" in lines

    spec["resources"].update(launcher="deepspeed", zero={"stage": 3})
    result = flotilla("submit", str(write(spec, tmp_path / "ds.yaml")), "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed \'s/$/ slots=1/\' >"$RUN_DIR/hostfile"'
        in result.stdout
    )
    (line,) = [x for x in result.stdout.splitlines() if "deepspeed.launcher.runner" in x]
    task = shlex.split(line)[2]  # bash -c '<this>' &
    assert '--no_ssh --node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR"' in task


SLURM_STAND_INS = {
    "srun": "exit 85",  # every task saved a checkpoint and asks for a requeue (REQUEUE_EXIT_CODE)
    "scontrol": 'if [ "$1" = show ]; then echo node1; else {requeue}; fi',
}


@pytest.mark.parametrize(
    ("requeue", "code", "last_event"),
    [
        # Slurm accepts the requeue and ends the job at once: TERM to every process of the job,
        # scontrol included, which can die of it before it reports success (seen in a real run)
        ("kill -TERM 0; sleep 30", 0, "requeued"),
        ("echo 'scontrol: error: Job is not requeueable' >&2; exit 1", 1, "failed"),
    ],
    ids=["accepted-and-terminated", "refused"],
)
def test_the_batch_script_tells_an_accepted_requeue_from_a_refused_one(
    tiny_llama: Path, tmp_path: Path, requeue: str, code: int, last_event: str
) -> None:
    """The rendered script's requeue branch, with srun and scontrol standing in for Slurm's, which
    the real-cluster test above cannot make lose its race on demand."""
    result = flotilla(
        "submit", str(write(slurm_job(tiny_llama, tmp_path), tmp_path / "job.yaml")), "--dry-run"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [
        shlex.split(line)[1].split("=", 1)[1]
        for line in result.stdout.splitlines()
        if line.startswith("export RUN_DIR=")
    ]
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in SLURM_STAND_INS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body.format(requeue=requeue) + "\n")
        (bin_dir / name).chmod(0o755)
    slurm_env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_CPUS_PER_TASK": "1",
    }
    env = {**os.environ, **slurm_env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    # a session of its own: the stand-in's TERM to its process group must not reach pytest
    done = subprocess.run(
        ["bash", "-s"],
        input=result.stdout,
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        start_new_session=True,
    )
    recorded = [e["event"] for e in events(Path(run_dir))]
    assert (done.returncode, recorded[-1]) == (code, last_event), (recorded, done.stdout, done.stderr)
    assert recorded[:2] == ["started", "requeued"]


def test_bad_slurm_section_is_a_clear_error(tiny_llama: Path, tmp_path: Path) -> None:
    spec = slurm_job(tiny_llama, tmp_path, time="2 hours", extra_sbatch=["--nodes=4"], mem="4GB")
    spec["slurm"]["partiton"] = "gpu"
    result = flotilla("validate", str(write(spec, tmp_path / "bad.yaml")))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())
    assert "slurm.time" in text and "not a Slurm time limit" in text
    assert "--nodes is written by Flotilla; set resources.nodes instead" in text
    assert "slurm.mem" in text and "16G" in text
    assert "slurm.partiton: unknown key; did you mean 'partition'?" in text

    spec = slurm_job(tiny_llama, tmp_path, time="10", signal_grace_seconds=900)
    result = flotilla("submit", str(write(spec, tmp_path / "grace.yaml")), "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "slurm.signal_grace_seconds: 900 s is not shorter than slurm.time '10' (600 s)" in " ".join(
        result.stderr.split()
    )


def test_shipped_slurm_config_validates_and_renders() -> None:
    config = str(REPO / "configs" / "slurm-multinode.yaml")
    assert flotilla("validate", config).returncode == 0
    result = flotilla("submit", config, "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "#SBATCH --nodes=2" in result.stdout and "#SBATCH --cpus-per-task=2" in result.stdout


def test_two_node_job_trains_and_reports(reference: Submitted, tiny_llama: Path) -> None:
    run_dir = reference.run_dir
    # Each node ran torchrun with its own rank, both pointed at the first node.
    node0, node1 = (run_dir / "logs" / f"node{n}.log" for n in (0, 1))
    assert "node_rank=0 nnodes=2 nproc_per_node=1 master=node1:" in node0.read_text()
    assert "node=node1" in node0.read_text() and "node=node2" in node1.read_text()
    assert "node_rank=1 nnodes=2 nproc_per_node=1 master=node1:" in node1.read_text()
    assert json.loads((run_dir / "manifest.json").read_text())["world_size"] == 2

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps[STEPS] < steps[1]

    assert_adapter_reloads_equal(tiny_llama, run_dir)

    # status / logs by run directory and by bare job id.
    assert status(reference) == "SUCCEEDED" and status(reference, reference.job_id) == "SUCCEEDED"
    text = log_text(reference, reference.job_id)
    assert "==> batch:" in text and "==> node0:" in text and "==> node1:" in text
    assert "flotilla: finished: training complete" in text
    assert "flotilla: finished" in log_text(reference, str(run_dir), "--follow")  # returns: job ended

    first_step = loss_records(run_dir)[0]["time"]
    submitted = float(json.loads((run_dir / "job.json").read_text())["submitted"])
    print(f"\nsubmit -> first optimizer step: {first_step - submitted:.1f} s")


def test_three_interruptions_requeue_and_resume_exactly(
    slurm_cluster: SlurmCluster, reference: Submitted, tiny_llama: Path, tmp_path: Path
) -> None:
    job = submit(slurm_cluster, slurm_job(tiny_llama, tmp_path, partition="low"), tmp_path)
    run_dir, job_id = job.run_dir, job.job_id
    resumed_after: list[float] = []

    def resume(interrupted: float) -> None:
        """Let the requeued job start now; wait for its first step (counted while nothing runs)."""
        slurm_cluster.release_requeued(job_id, timeout=TIMEOUT)
        wait_for_new_step(run_dir, len(loss_records(run_dir)))
        resumed_after.append(loss_records(run_dir)[-1]["time"] - interrupted)

    # 1. The time-limit path: USR1 to the batch shell, which passes it to every task.
    wait_for_new_step(run_dir, 0)
    interrupted = time.time()
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    slurm_cluster.wait_for_state(job_id, "PENDING", timeout=TIMEOUT)
    assert status(job) == "REQUEUED"
    assert events(run_dir)[-1]["event"] == "requeued"
    assert list((run_dir / "checkpoints").glob("checkpoint-*/flotilla-checkpoint.json"))
    resume(interrupted)

    # 2. Preemption: a job in the higher-priority partition needs both nodes; the tasks get SIGTERM.
    interrupted = time.time()
    high_job = ["sbatch", "--parsable", "-p", "high", "-N2", "--exclusive", "--wrap", "sleep 1"]
    high = slurm_cluster.run([*high_job, "-D", str(tmp_path), "-o", f"{tmp_path}/high-%j.out"]).stdout.strip()
    resume(interrupted)
    assert slurm_cluster.job_state(high) == "COMPLETED"

    # 3. An administrator's `scontrol requeue`.
    interrupted = time.time()
    slurm_cluster.run(["scontrol", "requeue", job_id])
    resume(interrupted)

    wait_for_state(job, "SUCCEEDED")
    assert {"RUNNING", "REQUEUED", "SUCCEEDED"} <= job.seen_states
    assert slurm_cluster.job_info(job_id)["Restarts"] == "3"
    assert (run_dir / "logs" / "node0.log").read_text().count("resuming from") == 3
    assert [e["event"] for e in events(run_dir)].count("started") == 4

    expected, got = losses(reference.run_dir), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    print("\ninterruption -> first resumed optimizer step: " + ", ".join(f"{s:.1f} s" for s in resumed_after))


def test_deepspeed_launcher_and_a_restart_budget_of_one(
    slurm_cluster: SlurmCluster, tiny_llama: Path, tmp_path: Path
) -> None:
    """DeepSpeed's launcher per node (ZeRO-3): two interruptions, each checkpointed; the second
    exhausts ``max_restarts: 1`` and the job ends FAILED with the reason in its log."""
    import_or_unavailable("deepspeed")
    spec = slurm_job(tiny_llama, tmp_path, max_restarts=1)
    spec["resources"].update(launcher="deepspeed", zero={"stage": 3})
    spec["eval"]["at_start"] = False
    job = submit(slurm_cluster, spec, tmp_path)
    wait_for_new_step(job.run_dir, 0)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job.job_id])
    slurm_cluster.release_requeued(job.job_id, timeout=TIMEOUT)
    wait_for_new_step(job.run_dir, len(loss_records(job.run_dir)))
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job.job_id])

    wait_for_state(job, "FAILED")
    last = events(job.run_dir)[-1]
    assert last["event"] == "failed" and last["restart"] == 1
    assert "restart budget exhausted" in last["detail"] and "slurm.max_restarts=1" in last["detail"]
    assert "restart budget exhausted" in log_text(job, job.job_id)
    assert slurm_cluster.job_info(job.job_id)["Restarts"] == "1"
    assert not (job.run_dir / "summary.json").exists()
    checkpoints = sorted((job.run_dir / "checkpoints").glob("checkpoint-*/flotilla-checkpoint.json"))
    assert len(checkpoints) == 2  # one per interruption: `flotilla run --resume` can go on
    for node in (0, 1):
        log = (job.run_dir / "logs" / f"node{node}.log").read_text()
        assert f"deepspeed.launcher.runner --hostfile={job.run_dir}/hostfile" in log
        assert f"--node_rank={node} " in log and f"launcher.train {job.run_dir}" in log
    assert "resuming from" in (job.run_dir / "logs" / "node0.log").read_text()


def test_cancel_a_running_job(slurm_cluster: SlurmCluster, tiny_llama: Path, tmp_path: Path) -> None:
    job = submit(slurm_cluster, slurm_job(tiny_llama, tmp_path), tmp_path)
    slurm_cluster.wait_for_state(job.job_id, "RUNNING", timeout=TIMEOUT)
    result = flotilla("cancel", str(job.run_dir), env=job.env, timeout=60)
    assert result.returncode == 0 and f"cancelled {job.job_id}" in result.stdout
    wait_for_state(job, "CANCELLED")
    assert "==> batch:" in log_text(job, job.job_id, "-f")  # follow mode ends with the job
    again = flotilla("cancel", job.job_id, env=job.env, timeout=60)
    assert again.returncode == 2 and "already ended (CANCELLED)" in again.stderr
