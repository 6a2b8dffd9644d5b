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

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console

from launcher.backends.base import RunHandle, follow_logs
from launcher.backends.local import free_port, run_state, torchrun_command
from launcher.errors import REQUEUE_EXIT_CODE, BackendError
from launcher.plan import Plan

RankSource = Literal["local", "hostfile", "slurm"]
#: Environment variable naming the hostfile of a multi-node run.
HOSTFILE_ENV = "FLOTILLA_HOSTFILE"
#: Prefixes of environment variables the pdsh runner forwards to the other nodes.
FORWARDED_ENV = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "NCCL_", "GLOO_", "FLOTILLA_", "TORCH_")
LOG_FILE = "launcher.log"
EXIT_FILE = "launcher.exit"
CANCEL_FILE = "launcher.cancelled"
_SHELL_REFERENCE = re.compile(r"^\$(\w+|\{\w+\})$")


def launcher_command(
    plan: Plan,
    *,
    rank_source: RankSource = "local",
    master_addr: str = "127.0.0.1",
    master_port: int | str,
    hostfile: Path | None = None,
    node_rank: str = "$SLURM_NODEID",
    module: str = "launcher.worker",
    python: str = sys.executable,
) -> list[str]:
    """The DeepSpeed launcher command that starts ``python -m module RUN_DIR`` in every rank.

    ``rank_source`` says how a node learns its place: ``local`` (one node), ``hostfile`` (this
    machine starts every node over pdsh/ssh; ``hostfile`` required) or ``slurm`` (run once per node,
    e.g. by ``srun --ntasks-per-node=1``; ``node_rank`` is usually ``$SLURM_NODEID``, and
    ``master_addr``/``master_port`` may be shell references such as ``$MASTER_ADDR``). For ``slurm``
    the hostfile only gives the node count and slots; :func:`write_hostfile` writes one.
    """
    command = [python, "-u", "-m", "deepspeed.launcher.runner"]
    if rank_source == "local":
        command += _local_devices(plan)
    elif rank_source in ("hostfile", "slurm"):
        if hostfile is None:
            raise BackendError(f"rank source {rank_source!r} needs a hostfile")
        command += [f"--hostfile={hostfile}", f"--num_nodes={plan.nodes}"]
        if rank_source == "hostfile":
            command += [f"--num_gpus={plan.processes_per_node}", "--launcher=pdsh"]
        else:
            command += ["--no_ssh", f"--node_rank={node_rank}"]
    else:
        raise BackendError(f"unknown rank source {rank_source!r}; use local, hostfile or slurm")
    command += [
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        "--no_local_rank",
        "--module",
        module,
        plan.run_dir,
    ]
    return command


def _local_devices(plan: Plan) -> list[str]:
    """One node's ranks: ``--num_gpus N``, or DeepSpeed's own reading of ``CUDA_VISIBLE_DEVICES``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if plan.device == "cuda" and visible:
        count = len([d for d in visible.split(",") if d.strip()])
        if count != plan.processes_per_node:
            raise BackendError(
                f"CUDA_VISIBLE_DEVICES={visible} lists {count} GPUs but the plan has "
                f"{plan.processes_per_node} processes per node; make them agree"
            )
        return []  # DeepSpeed turns CUDA_VISIBLE_DEVICES into --include localhost:<ids>
    return ["--num_nodes=1", f"--num_gpus={plan.processes_per_node}"]


def render_shell(command: list[str]) -> str:
    """``command`` as one shell line; ``$VAR`` references (whole arguments or after ``=``) stay live."""
    parts = []
    for arg in command:
        flag, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if _SHELL_REFERENCE.match(value):
            parts.append(f'{flag}{sep}"{value}"')
        else:
            parts.append(shlex.quote(arg))
    return " ".join(parts)


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """``(host, slots)`` per line of a DeepSpeed/MPI hostfile (``# comments`` and blank lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BackendError(f"cannot read the hostfile {path}: {exc}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", text)
        if not match:
            raise BackendError(f"{path}, line {number}: expected 'hostname slots=N', got {line.strip()!r}")
        hosts.append((match.group(1), int(match.group(2))))
    if not hosts:
        raise BackendError(f"{path} lists no hosts")
    return hosts


def write_hostfile(path: Path, hosts: list[str], slots: int) -> Path:
    """Write a hostfile giving each of ``hosts`` ``slots`` ranks."""
    path.write_text("".join(f"{host} slots={slots}\n" for host in hosts), encoding="utf-8")
    return path


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
        if wait:
            code = subprocess.run(start.command, env=env, check=False).returncode
            return RunHandle(self.name, run_dir, exit_code=code, details=details)
        (run_dir / EXIT_FILE).unlink(missing_ok=True)
        script = f"{render_shell(start.command)}; echo $? > {shlex.quote(str(run_dir / EXIT_FILE))}"
        with (run_dir / LOG_FILE).open("ab") as log:
            process = subprocess.Popen(
                ["/bin/sh", "-c", script],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return RunHandle(self.name, run_dir, job_id=str(process.pid), details=details)

    def _start(self, plan: Plan, port: int) -> _Start:
        launcher = plan.spec["resources"].get("launcher", "auto")
        hostfile = os.environ.get(HOSTFILE_ENV)
        if plan.nodes == 1 and not hostfile:
            if launcher == "torchrun":
                return _Start(torchrun_command(plan, port), "torchrun", "127.0.0.1")
            return _Start(launcher_command(plan, master_port=port), "the deepspeed launcher", "127.0.0.1")
        if launcher == "torchrun":
            raise BackendError("resources.launcher: torchrun runs one node here; use deepspeed for several")
        if not hostfile:
            raise BackendError(
                f"resources.nodes={plan.nodes} needs a hostfile: set {HOSTFILE_ENV}=<file> with one "
                "'hostname slots=N' line per node (or use the slurm backend)"
            )
        hosts = read_hostfile(Path(hostfile))
        if len(hosts) < plan.nodes:
            raise BackendError(f"{hostfile} lists {len(hosts)} hosts; the plan needs {plan.nodes} nodes")
        short = [h for h, slots in hosts[: plan.nodes] if slots < plan.processes_per_node]
        if short:
            raise BackendError(f"{hostfile}: {short[0]} has fewer than {plan.processes_per_node} slots")
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
        if _alive(int(job_id)):
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
        if not job_id.isdigit() or not _alive(int(job_id)):
            raise BackendError(f"job {job_id} is not running")
        if run_dir is not None:
            (run_dir / CANCEL_FILE).touch()
        os.killpg(int(job_id), signal.SIGTERM)  # the launcher's session: ranks checkpoint, then stop


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_forwarded_env(run_dir: Path) -> Path:
    """Variables the remote ranks need, in DeepSpeed's env file format (read through ``DS_ENV_FILE``)."""
    lines = [
        f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(FORWARDED_ENV) and "\n" not in v
    ]
    env_file = run_dir / "deepspeed.env"
    env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return env_file


@dataclass
class _Start:
    """How a run starts: the command, who starts the ranks, the master address, extra environment."""

    command: list[str]
    starter: str
    master: str
    env: dict[str, str] = field(default_factory=dict)


BACKEND = DeepSpeedBackend()
