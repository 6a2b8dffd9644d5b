"""The DeepSpeed backend: DeepSpeed's launcher starts the train core in every rank.

- one node: ``deepspeed --num_nodes 1 --num_gpus N`` (on a CPU machine DeepSpeed's CPU accelerator
  starts N ranks that talk over gloo);
- several nodes: a hostfile (``name slots=N`` per line, from ``$FLOTILLA_HOSTFILE``) and DeepSpeed's
  pdsh/ssh runner;
- Slurm: one DeepSpeed launcher per node, its node rank from ``$SLURM_NODEID``
  (:func:`launcher_command` with ``rank_source="slurm"``; the Slurm backend renders it into sbatch).

Ranks reach each other at a master address and port chosen here and printed before the start.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console

from launcher.atomic import write_owner_only
from launcher.backends.base import JOB_RECORD, RunHandle, follow_logs
from launcher.backends.commands import (
    SHM_SEGMENTS,
    free_port,
    launcher_command,
    read_hostfile,
    release_shared_memory,
    render_shell,
    torchrun_command,
)
from launcher.errors import REQUEUE_EXIT_CODE, FlotillaError
from launcher.plan import Plan
from launcher.processes import run_process_group
from launcher.redact import is_secret_name
from launcher.rundir import run_state

#: Environment variable naming the hostfile of a multi-node run.
HOSTFILE_ENV = "FLOTILLA_HOSTFILE"
#: Prefixes of environment variables the pdsh runner forwards to the other nodes.
FORWARDED_ENV = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "NCCL_", "GLOO_", "FLOTILLA_", "TORCH_")
SECRETS_LISTED = "FLOTILLA_FORWARD_SECRETS"
LOG_FILE = "launcher.log"
EXIT_FILE = "launcher.exit"
CANCEL_FILE = "launcher.cancelled"


class DeepSpeedBackend:
    """The ``deepspeed`` launcher on this node, or on the nodes of a hostfile over pdsh/ssh."""

    name = "deepspeed"

    def launch(self, plan: Plan, console: Console, wait: bool = True) -> RunHandle:
        run_dir = Path(plan.run_dir)
        port = plan.spec["resources"].get("master_port") or free_port()
        start = self._start(plan, port)
        console.print(
            f"launching {plan.world_size} ranks ({plan.nodes} node(s) × {plan.processes_per_node}) with "
            f"{start.starter}; master {start.master}:{port}",
            highlight=False,
        )
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **start.env}
        env["PYTHONUNBUFFERED"] = "1"
        details = {"master": f"{start.master}:{port}"}
        segments = SHM_SEGMENTS.format(uid=os.getuid(), addr=start.master, port=port)
        if wait:
            code = run_process_group(start.command, env)
            release_shared_memory(segments)
            return RunHandle(self.name, run_dir, exit_code=code, details=details)
        (run_dir / EXIT_FILE).unlink(missing_ok=True)
        script = (
            f"{render_shell(start.command)}; code=$?; rm -f {shlex.quote(segments)}[0-9]*; "
            f"echo $code > {shlex.quote(str(run_dir / EXIT_FILE))}"
        )
        with (run_dir / LOG_FILE).open("ab") as log:
            process = subprocess.Popen(
                ["/bin/sh", "-c", script],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        details["started"] = str(psutil.Process(process.pid).create_time())  # the PID's identity
        return RunHandle(self.name, run_dir, job_id=str(process.pid), details=details)

    def _start(self, plan: Plan, port: int) -> _Start:
        launcher = plan.spec["resources"].get("launcher", "auto")
        hostfile = os.environ.get(HOSTFILE_ENV)
        if plan.nodes == 1 and not hostfile:
            if launcher == "torchrun":
                return _Start(torchrun_command(plan, port), "torchrun", "127.0.0.1")
            return _Start(launcher_command(plan, master_port=port), "the deepspeed launcher", "127.0.0.1")
        if launcher == "torchrun":
            raise FlotillaError("resources.launcher: torchrun runs one node here; use deepspeed for several")
        if not hostfile:
            raise FlotillaError(
                f"resources.nodes={plan.nodes} needs a hostfile: set {HOSTFILE_ENV}=<file> with one "
                "'hostname slots=N' line per node (or use the slurm backend)"
            )
        hosts = read_hostfile(Path(hostfile))
        if len(hosts) < plan.nodes:
            raise FlotillaError(f"{hostfile} lists {len(hosts)} hosts; the plan needs {plan.nodes} nodes")
        short = [h for h, slots in hosts[: plan.nodes] if slots < plan.processes_per_node]
        if short:
            raise FlotillaError(f"{hostfile}: {short[0]} has fewer than {plan.processes_per_node} slots")
        master = hosts[0][0]
        command = launcher_command(
            plan, rank_source="hostfile", master_addr=master, master_port=port, hostfile=Path(hostfile)
        )
        env_file = _write_forwarded_env(Path(plan.run_dir))
        return _Start(command, "the deepspeed launcher over pdsh/ssh", master, {"DS_ENV_FILE": str(env_file)})

    def status(self, job_id: str, run_dir: Path | None = None) -> str:
        if run_dir is None:
            return "UNKNOWN"
        state = run_state(run_dir)
        if state == "SUCCEEDED" or not job_id or not job_id.isdigit():
            return state
        exit_file = run_dir / EXIT_FILE
        if exit_file.is_file():
            code = int(exit_file.read_text().strip() or "1")
            return "SUCCEEDED" if code == 0 else ("REQUEUED" if code == REQUEUE_EXIT_CODE else "FAILED")
        if _is_the_job(int(job_id), run_dir):
            return state if state != "UNKNOWN" else "RUNNING"
        return "CANCELLED" if (run_dir / CANCEL_FILE).is_file() else "FAILED"

    def logs(self, job_id: str, run_dir: Path | None = None, follow: bool = False) -> str:
        if follow and run_dir is not None:
            log = run_dir / LOG_FILE
            follow_logs(
                lambda: [("launcher", log)] if log.is_file() else [],
                lambda: self.status(job_id, run_dir) not in ("PENDING", "RUNNING"),
                1.0,
            )
            return ""
        for name in (LOG_FILE, "metrics.jsonl"):
            path = run_dir / name if run_dir else None
            if path and path.is_file():
                return path.read_text(errors="replace")
        return ""

    def cancel(self, job_id: str, run_dir: Path | None = None) -> None:
        if not job_id.isdigit() or not _is_the_job(int(job_id), run_dir):
            raise FlotillaError(f"job {job_id} is not running")  # a request that cannot apply
        if run_dir is not None:
            (run_dir / CANCEL_FILE).touch()
        os.killpg(int(job_id), signal.SIGTERM)  # the launcher's session: ranks checkpoint, then stop


def _is_the_job(pid: int, run_dir: Path | None) -> bool:
    """Whether ``pid`` is still the launcher ``flotilla submit`` started: the PID must exist and,
    where the run's job record holds its start time, have started then (not a later process that
    reuses the PID)."""
    try:
        process = psutil.Process(pid)
        started = process.create_time()
    except psutil.Error:
        return False
    record = run_dir / JOB_RECORD if run_dir is not None else None
    if record is None or not record.is_file():
        return True  # a bare PID: nothing recorded to compare with
    expected = json.loads(record.read_text()).get("started")
    return expected is None or abs(float(expected) - started) < 0.05


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    """The variables remote ranks get: the forwarded prefixes, less secrets (a name containing
    TOKEN, KEY, SECRET or PASSWORD) unless ``FLOTILLA_FORWARD_SECRETS`` lists the name."""
    listed = {name.strip() for name in environ.get(SECRETS_LISTED, "").split(",") if name.strip()}
    return {
        k: v
        for k, v in sorted(environ.items())
        if k.startswith(FORWARDED_ENV) and "\n" not in v and (k in listed or not is_secret_name(k.upper()))
    }


def _write_forwarded_env(run_dir: Path) -> Path:
    """Variables the remote ranks need, in DeepSpeed's env file format (read through ``DS_ENV_FILE``),
    owner-only."""
    env_file = run_dir / "deepspeed.env"
    lines = [f"{k}={v}" for k, v in forwarded_env(dict(os.environ)).items()]
    write_owner_only(env_file, ("\n".join(lines) + "\n").encode())
    return env_file


@dataclass
class _Start:
    """How a run starts: the command, who starts the ranks, the master address, extra environment."""

    command: list[str]
    starter: str
    master: str
    env: dict[str, str] = field(default_factory=dict)


BACKEND = DeepSpeedBackend()
