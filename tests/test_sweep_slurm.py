"""``flotilla sweep --backend slurm``: one job array on the 2-node dev cluster (``slurm_cluster``),
each task one trial; ``flotilla status/logs/cancel <sweep dir>`` cover the array's tasks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from launcher.rundir import read_jsonl
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


def sweep_status(env: dict[str, str], sweep_dir: Path) -> list[str]:
    """The state of every trial, as ``flotilla status <sweep dir>`` prints it."""
    result = flotilla("status", str(sweep_dir), env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.split()[0] for line in result.stdout.splitlines()[1:]]


def submit_sweep(env: dict[str, str], spec: Path, grid: str, concurrent: int) -> Path:
    result = flotilla(
        "sweep", str(spec), "--grid", grid, "--backend", "slurm", "--max-concurrent", str(concurrent),
        "--detach", env={**env, "COLUMNS": "1000"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return next(spec.parent.glob("runs/tiny/sweep-*"))


def test_a_job_array_trains_every_trial_and_the_table_names_the_best(
    slurm_cluster: SlurmCluster, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = write_spec(slurm_sweep_job(tiny_llama, tmp_path, steps=4))
    grid = "train.learning_rate=1e-4,1e-3,3e-3,1e-2"
    sweep_dir = submit_sweep(slurm_cluster.env, spec, grid, concurrent=2)
    array_id = json.loads((sweep_dir / "array.json").read_text())["job_id"]
    assert "#SBATCH --array=0,1,2,3%2" in (sweep_dir / "trials" / "array.sbatch").read_text()

    seen: set[tuple[str, ...]] = set()
    deadline = time.monotonic() + TIMEOUT
    while (states := sweep_status(slurm_cluster.env, sweep_dir)) != ["SUCCEEDED"] * 4:
        assert time.monotonic() < deadline, states
        assert not {"FAILED", "CANCELLED"} & set(states), states
        seen.add(tuple(states))
        time.sleep(3.0)
    assert max(s.count("RUNNING") for s in seen) <= 2  # %2: at most two tasks at once

    trials = sorted((sweep_dir / "trials").glob("trial-*"))
    for index, run_dir in enumerate(trials):
        record = json.loads((run_dir / "job.json").read_text())
        assert record["job_id"] == f"{array_id}_{index}"
        events = [e["event"] for e in read_jsonl(run_dir / "slurm-events.jsonl")]
        assert events == ["started", "finished"], events
    logs = flotilla("logs", str(sweep_dir), env=slurm_cluster.env, timeout=60)
    assert logs.returncode == 0 and logs.stdout.count("=== trial-") == 4
    assert logs.stdout.count("flotilla: started") == 4  # each task's batch output, from its run dir

    again = flotilla(
        "sweep", str(spec), "--grid", grid, "--backend", "slurm", env=slurm_cluster.env, timeout=120
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already done (skipped)" in again.stderr  # nothing submitted again: the results gathered
    results = json.loads((sweep_dir / "results.json").read_text())
    finals = {r["trial"]: r["eval_loss"] for r in results["trials"]}
    assert results["best"]["trial"] == min(finals, key=finals.__getitem__)
    assert f"best: {results['best']['trial']}" in again.stdout


def test_cancel_ends_every_task_of_the_array(
    slurm_cluster: SlurmCluster, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = write_spec(slurm_sweep_job(tiny_llama, tmp_path, steps=10_000))
    sweep_dir = submit_sweep(slurm_cluster.env, spec, "peft.r=2,4,8", concurrent=1)
    deadline = time.monotonic() + TIMEOUT
    result = flotilla("cancel", str(sweep_dir), env=slurm_cluster.env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trial-000, trial-001, trial-002" in result.stdout
    while (states := sweep_status(slurm_cluster.env, sweep_dir)) != ["CANCELLED"] * 3:
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    queue = slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    assert queue == []
