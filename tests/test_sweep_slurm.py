"""``flotilla sweep --backend slurm``: one job array on the 2-node dev cluster (``slurm_cluster``),
each task one trial; ``flotilla status/logs/cancel <sweep dir>`` cover the array's tasks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.rundir import read_jsonl
from launcher.sweep import sweep_status
from tests.conftest import flotilla, tiny_job
from tests.slurm_cluster import SlurmCluster

TIMEOUT = 300.0


def slurm_sweep_job(model: Path, tmp_path: Path, steps: int) -> dict[str, Any]:
    return tiny_job(
        model,
        tmp_path,
        data={"max_train_rows": 32, "max_validation_rows": 8},
        train={"max_steps": steps, "save_steps": 2},
        eval={"steps": 2, "at_start": False},
        resources={"backend": "slurm", "nodes": 1, "processes_per_node": 1},
        slurm={"time": "00:10:00", "signal_grace_seconds": 30},
    )


def states(sweep_dir: Path) -> list[str]:
    """The state of every trial, as ``flotilla status <sweep dir>`` prints it (in this process: a
    CLI process per poll would slow the tasks on 2 cores; the CLI's status is checked once)."""
    return [line.split()[0] for line in sweep_status(sweep_dir).splitlines()[1:]]


@pytest.fixture
def cluster_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process talks to the dev cluster too (SLURM_CONF)."""
    for key, value in slurm_cluster.env.items():
        if key.startswith("SLURM_"):
            monkeypatch.setenv(key, value)
    return slurm_cluster.env


def submit_sweep(env: dict[str, str], spec: Path, grid: str, concurrent: int) -> Path:
    result = flotilla(
        "sweep", str(spec), "--grid", grid, "--backend", "slurm", "--max-concurrent", str(concurrent),
        "--detach", env={**env, "COLUMNS": "1000"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return next(spec.parent.glob("runs/tiny/sweep-*"))


def test_a_job_array_trains_every_trial_and_the_table_names_the_best(
    cluster_env: dict[str, str], tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = write_spec(slurm_sweep_job(tiny_llama, tmp_path, steps=4))
    grid = "train.learning_rate=1e-4,1e-3,3e-3,1e-2"
    sweep_dir = submit_sweep(cluster_env, spec, grid, concurrent=2)
    array_id = json.loads((sweep_dir / "array.json").read_text())["job_id"]
    assert "#SBATCH --array=0,1,2,3%2" in (sweep_dir / "trials" / "array.sbatch").read_text()

    seen: set[tuple[str, ...]] = set()
    deadline = time.monotonic() + TIMEOUT
    while (now := states(sweep_dir)) != ["SUCCEEDED"] * 4:
        assert time.monotonic() < deadline, now
        assert not {"FAILED", "CANCELLED"} & set(now), now
        seen.add(tuple(now))
        time.sleep(1.0)
    assert max(s.count("RUNNING") for s in seen) <= 2  # %2: at most two tasks at once
    status = flotilla("status", str(sweep_dir), env=cluster_env, timeout=60)
    assert status.returncode == 0 and status.stdout.count("SUCCEEDED") == 5, status.stdout  # header + 4

    trials = sorted((sweep_dir / "trials").glob("trial-*"))
    for index, run_dir in enumerate(trials):
        record = json.loads((run_dir / "job.json").read_text())
        assert record["job_id"] == f"{array_id}_{index}"
        events = [e["event"] for e in read_jsonl(run_dir / "slurm-events.jsonl")]
        assert events == ["started", "finished"], events
    logs = flotilla("logs", str(sweep_dir), env=cluster_env, timeout=60)
    assert logs.returncode == 0 and logs.stdout.count("=== trial-") == 4
    assert logs.stdout.count("flotilla: started") == 4  # each task's batch output, from its run dir

    again = flotilla("sweep", str(spec), "--grid", grid, "--backend", "slurm", env=cluster_env, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already done (skipped)" in again.stderr  # nothing submitted again: the results gathered
    results = json.loads((sweep_dir / "results.json").read_text())
    finals = {r["trial"]: r["eval_loss"] for r in results["trials"]}
    assert results["best"]["trial"] == min(finals, key=finals.__getitem__)
    assert f"best: {results['best']['trial']}" in again.stdout


def test_cancel_ends_every_task_of_the_array(
    slurm_cluster: SlurmCluster, cluster_env: dict[str, str], tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = write_spec(slurm_sweep_job(tiny_llama, tmp_path, steps=10_000))
    sweep_dir = submit_sweep(cluster_env, spec, "peft.r=2,4,8", concurrent=1)
    deadline = time.monotonic() + TIMEOUT
    result = flotilla("cancel", str(sweep_dir), env=cluster_env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trial-000, trial-001, trial-002" in result.stdout
    while (now := states(sweep_dir)) != ["CANCELLED"] * 3:
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    queue = slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    assert queue == []
