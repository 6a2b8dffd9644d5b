"""The local backend: the train core in this process, or torchrun for several processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from launcher.backends.base import RunHandle
from launcher.errors import REQUEUE_EXIT_CODE, BackendError
from launcher.plan import Plan


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_state(run_dir: Path) -> str:
    """A run's state read from its directory (for backends without a scheduler)."""
    if (run_dir / "summary.json").is_file():
        return "SUCCEEDED"
    if (run_dir / "metrics.jsonl").is_file():
        return "RUNNING"
    return "PENDING" if (run_dir / "plan.json").is_file() else "UNKNOWN"


def torchrun_command(plan: Plan, master_port: int) -> list[str]:
    """``torchrun`` with the plan's processes on one node, rendezvous on loopback."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={plan.processes_per_node}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={master_port}",
        "-m",
        "launcher.worker",
        plan.run_dir,
    ]


class LocalBackend:
    """One machine: in-process for one rank, ``torchrun`` on loopback for several."""

    name = "local"

    def launch(self, plan: Plan, console: Console, wait: bool = True) -> RunHandle:
        run_dir = Path(plan.run_dir)
        if plan.nodes > 1:
            raise BackendError("the local backend runs on one node; use slurm or deepspeed for several")
        if not wait:
            raise BackendError(
                "the local backend runs in the foreground: use flotilla run (or --backend deepspeed)"
            )
        if plan.world_size == 1:
            from launcher.train import run_training

            outcome = run_training(run_dir, console)
            return RunHandle(self.name, run_dir, exit_code=REQUEUE_EXIT_CODE if outcome.interrupted else 0)
        port = plan.spec["resources"].get("master_port") or free_port()
        command = torchrun_command(plan, port)
        console.print(f"launching {plan.world_size} processes on 127.0.0.1:{port}")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        code = subprocess.run(command, env=env, check=False).returncode
        return RunHandle(self.name, run_dir, exit_code=code)

    def status(self, job_id: str, run_dir: Path | None = None) -> str:
        return run_state(run_dir) if run_dir else "UNKNOWN"

    def logs(self, job_id: str, run_dir: Path | None = None, follow: bool = False) -> str:
        metrics = (run_dir / "metrics.jsonl") if run_dir else None
        return metrics.read_text() if metrics and metrics.is_file() else ""

    def cancel(self, job_id: str, run_dir: Path | None = None) -> None:
        raise BackendError("local runs are stopped with Ctrl-C (or SIGTERM, which saves a checkpoint first)")


BACKEND = LocalBackend()
