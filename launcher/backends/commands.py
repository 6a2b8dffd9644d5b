"""What backends share: free ports, the worker module, the torchrun and DeepSpeed launcher commands,
and the removal of what DeepSpeed's launcher leaves behind.

- ``torchrun``: the plan's processes on one node, rendezvous on loopback;
- DeepSpeed's launcher, by how a node learns its place: ``local`` (one node; on a CPU machine
  DeepSpeed's CPU accelerator starts N ranks that talk over gloo), ``hostfile`` (this machine starts
  every node over pdsh/ssh) or ``slurm`` (one launcher per node, its rank from ``$SLURM_NODEID``).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

from launcher.errors import FlotillaError
from launcher.plan import Plan

#: The process every backend starts once per rank: ``python -m launcher.train <run dir>``.
WORKER_MODULE = "launcher.train"
RankSource = Literal["local", "hostfile", "slurm"]
_SHELL_REFERENCE = re.compile(r"^\$(\w+|\{\w+\})$")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now.

    Every socket stays bound until all are picked: ports picked one after another, each released
    before the next, can repeat (two of a private Ray head's seven did, and the head refused to
    start).
    """
    with ExitStack() as bound:
        sockets = [bound.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


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
        WORKER_MODULE,
        plan.run_dir,
    ]


def launcher_command(
    plan: Plan,
    *,
    rank_source: RankSource = "local",
    master_addr: str = "127.0.0.1",
    master_port: int | str,
    hostfile: Path | None = None,
    node_rank: str = "$SLURM_NODEID",
    module: str = WORKER_MODULE,
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
            raise FlotillaError(f"rank source {rank_source!r} needs a hostfile")
        command += [f"--hostfile={hostfile}", f"--num_nodes={plan.nodes}"]
        if rank_source == "hostfile":
            command += [f"--num_gpus={plan.processes_per_node}", "--launcher=pdsh"]
        else:
            command += ["--no_ssh", f"--node_rank={node_rank}"]
    else:
        raise FlotillaError(f"unknown rank source {rank_source!r}; use local, hostfile or slurm")
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
            raise FlotillaError(
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
        raise FlotillaError(f"cannot read the hostfile {path}: {exc}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", text)
        if not match:
            raise FlotillaError(f"{path}, line {number}: expected 'hostname slots=N', got {line.strip()!r}")
        hosts.append((match.group(1), int(match.group(2))))
    if not hosts:
        raise FlotillaError(f"{path} lists no hosts")
    return hosts


def write_hostfile(path: Path, hosts: list[str], slots: int) -> Path:
    """Write a hostfile giving each of ``hosts`` ``slots`` ranks."""
    path.write_text("".join(f"{host} slots={slots}\n" for host in hosts), encoding="utf-8")
    return path


#: DeepSpeed's shared-memory allreduce (every rank on one node) gives each rank a POSIX shared-memory
#: segment of 64 MiB named after the user and the master address and port (deepspeed 0.19,
#: ``csrc/cpu/comm/shm.cpp``) and never unlinks it: each run on a CPU node would keep N x 64 MiB of
#: RAM in /dev/shm until the next reboot. The backend removes its run's segments when the run ends.
SHM_SEGMENTS = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_"


def release_shared_memory(segments: str) -> None:
    """Unlink the run's DeepSpeed allreduce segments (:data:`SHM_SEGMENTS`, one per local rank)."""
    folder, prefix = os.path.split(segments)
    for path in Path(folder).glob(f"{prefix}[0-9]*"):
        if path.name[len(prefix) :].isdigit():
            path.unlink(missing_ok=True)
