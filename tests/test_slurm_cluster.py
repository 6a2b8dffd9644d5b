"""Real jobs on the loopback dev cluster from ``tests/slurm_cluster.py``.

Needs the ``slurm_cluster`` fixture registered (``pytest_plugins =
["tests.slurm_cluster"]`` in the root conftest, or ``-p tests.slurm_cluster``).
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.slurm_cluster import SlurmCluster

TWO_NODE_SCRIPT = r"""#!/bin/bash
srun bash -c '
addr=$(getent hosts node1 | awk "{print \$1}")
echo "task procid=$SLURM_PROCID nodeid=$SLURM_NODEID node=$SLURMD_NODENAME node1=$addr"
'
"""

REQUEUE_SCRIPT = r"""#!/bin/bash
echo "run restart=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then
    exit 0
fi
for i in $(seq 240); do sleep 0.5; done  # until requeued
exit 1
"""


def _sbatch(cluster: SlurmCluster, workdir: Path, script: str, *opts: str) -> str:
    path = workdir / "job.sh"
    path.write_text(script)
    out = cluster.run(
        [
            "sbatch",
            "--parsable",
            "--time=2",
            "-D",
            str(workdir),
            "-o",
            f"{workdir}/%j.out",
            *opts,
            str(path),
        ]
    ).stdout
    return out.strip().split(";")[0]


def _wait_for_text(path: Path, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not in {path} after {timeout}s")


def test_two_node_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = _sbatch(slurm_cluster, tmp_path, TWO_NODE_SCRIPT, "--nodes=2", "--ntasks-per-node=1")
    slurm_cluster.wait_for_state(job, "COMPLETED")

    lines = [ln for ln in (tmp_path / f"{job}.out").read_text().splitlines() if ln.startswith("task ")]
    tasks = [dict(field.split("=", 1) for field in ln.split()[1:]) for ln in lines]
    assert len(tasks) == 2, lines
    assert {t["nodeid"] for t in tasks} == {"0", "1"}
    assert {t["node"] for t in tasks} == {"node1", "node2"}
    assert {t["procid"] for t in tasks} == {"0", "1"}
    assert all(t["node1"] == "127.0.0.1" for t in tasks), lines


def test_requeue_restarts_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = _sbatch(slurm_cluster, tmp_path, REQUEUE_SCRIPT, "--requeue", "--open-mode=append")
    out = tmp_path / f"{job}.out"
    slurm_cluster.wait_for_state(job, "RUNNING")
    _wait_for_text(out, "run restart=0")

    slurm_cluster.run(["scontrol", "requeue", job])
    slurm_cluster.release_requeued(job)
    info = slurm_cluster.wait_for_state(job, "COMPLETED")

    assert "run restart=1" in _wait_for_text(out, "run restart=1")
    assert info["Restarts"] == "1"
