"""The local backend: the train core in this process, or torchrun for several processes."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from launcher.backends.base import RunHandle
from launcher.backends.commands import free_port, torchrun_command
from launcher.errors import REQUEUE_EXIT_CODE, FlotillaError
from launcher.plan import Plan
from launcher.processes import run_process_group
from launcher.rundir import run_state


class LocalBackend:
    """One machine: in-process for one rank, ``torchrun`` on loopback for several."""

    name = "local"

    def launch(self, plan: Plan, console: Console, wait: bool = True) -> RunHandle:
        run_dir = Path(plan.run_dir)
        if plan.nodes > 1:
            raise FlotillaError("the local backend runs on one node; use slurm or deepspeed for several")
        if not wait:
            raise FlotillaError(
                "the local backend runs in the foreground: use flotilla run (or --backend deepspeed)"
            )
        if plan.world_size == 1:
            from launcher.train import run_training  # torch and transformers: only when training here

            outcome = run_training(run_dir, console)
            return RunHandle(self.name, run_dir, exit_code=REQUEUE_EXIT_CODE if outcome.interrupted else 0)
        port = plan.spec["resources"].get("master_port") or free_port()
        command = torchrun_command(plan, port)
        console.print(f"launching {plan.world_size} processes on 127.0.0.1:{port}")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        code = run_process_group(command, env)
        return RunHandle(self.name, run_dir, exit_code=code)

    def status(self, job_id: str, run_dir: Path | None = None) -> str:
        return run_state(run_dir) if run_dir else "UNKNOWN"

    def logs(self, job_id: str, run_dir: Path | None = None, follow: bool = False) -> str:
        metrics = (run_dir / "metrics.jsonl") if run_dir else None
        return metrics.read_text() if metrics and metrics.is_file() else ""

    def cancel(self, job_id: str, run_dir: Path | None = None) -> None:
        raise FlotillaError("local runs are stopped with Ctrl-C (or SIGTERM, which saves a checkpoint first)")


BACKEND = LocalBackend()
