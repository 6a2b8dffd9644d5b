"""Before a long run: every rank reaches the rendezvous and one all-reduce succeeds, within a timeout.

Each rank checks in at the TCP store on ``MASTER_ADDR:MASTER_PORT`` under its rank with its host name;
rank 0 waits for all of them and, when some are missing, every rank fails with a message naming the
ranks (and nodes) that did not arrive. Then the default process group is created on that store (the
Trainer, accelerate and DeepSpeed reuse it) and one all-reduce proves that the ranks can talk.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from launcher.errors import BackendError

#: Seconds every rank has to arrive (environment variable, default :data:`DEFAULT_TIMEOUT_S`).
TIMEOUT_ENV = "FLOTILLA_PREFLIGHT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
PREFIX = "flotilla/preflight"
REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PreflightError(BackendError):
    """A rank did not reach the rendezvous, or the ranks cannot talk to each other."""


def preflight(device: str, processes_per_node: int, timeout_s: float | None = None) -> str:
    """Check in this rank, wait for all, run one all-reduce; return a one-line summary.

    ``device`` picks the collective backend (``cuda``: nccl, else gloo). Raises :class:`PreflightError`.
    """
    timeout = timeout_s if timeout_s is not None else float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    started = time.monotonic()
    if dist.is_initialized():  # Ray Train (and others) made the process group already
        world = dist.get_world_size()
        _all_reduce(world, device, timeout, "the ranks")
        return f"preflight: {world} ranks, all-reduce ok in {time.monotonic() - started:.1f} s"
    missing_env = [name for name in REQUIRED_ENV if name not in os.environ]
    if missing_env:
        raise PreflightError(f"the launcher did not set {', '.join(missing_env)} for this process")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    store = _store(rank, world, timeout)
    hosts = _check_in(store, rank, world, processes_per_node, timeout, address)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        store=dist.PrefixStore(f"{PREFIX}/pg", store),
        rank=rank,
        world_size=world,
    )
    _all_reduce(world, device, timeout, f"ranks on {', '.join(sorted(set(hosts)))}")
    nodes = sorted(set(hosts))
    return (
        f"preflight: {world} ranks on {len(nodes)} host(s) ({', '.join(nodes)}) met at {address}; "
        f"all-reduce ok in {time.monotonic() - started:.1f} s"
    )


def _store(rank: int, world: int, timeout: float) -> dist.Store:
    """The TCP store: rank 0 hosts it, unless torchrun's agent already does (then all are clients)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    master = rank == 0 and not agent
    try:
        return dist.TCPStore(
            host,
            port,
            world,
            is_master=master,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except (RuntimeError, OSError) as exc:
        if master:
            raise PreflightError(
                f"rank 0 on {socket.gethostname()} cannot listen on {host}:{port}: {exc}"
            ) from None
        raise PreflightError(
            f"rank {rank} on {socket.gethostname()} could not reach the rendezvous at {host}:{port} "
            f"(where rank 0 listens) within {timeout:g} s: is rank 0's node up and the port open? ({exc})"
        ) from None


def _check_in(
    store: dist.Store, rank: int, world: int, per_node: int, timeout: float, address: str
) -> list[str]:
    """Record this rank's host; rank 0 waits for every rank and publishes the verdict to all."""
    store.set(f"{PREFIX}/arrived/{rank}", socket.gethostname())
    verdict_key = f"{PREFIX}/verdict"
    if rank == 0:
        deadline = time.monotonic() + timeout
        missing = list(range(world))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"{PREFIX}/arrived/{r}"])]
            if missing:
                time.sleep(0.1)
        verdict = "ok" if not missing else _missing_message(store, missing, world, per_node, timeout, address)
        store.set(verdict_key, verdict)
    else:
        try:
            store.wait([verdict_key], timedelta(seconds=timeout + 30))
        except RuntimeError:
            raise PreflightError(
                f"rank {rank} on {socket.gethostname()}: rank 0 gave no verdict within {timeout + 30:g} s"
            ) from None
        verdict = store.get(verdict_key).decode()
    if verdict != "ok":
        raise PreflightError(verdict)
    return [store.get(f"{PREFIX}/arrived/{r}").decode() for r in range(world)]


def _missing_message(
    store: dist.Store, missing: list[int], world: int, per_node: int, timeout: float, address: str
) -> str:
    arrived = [r for r in range(world) if r not in missing]
    seen = ", ".join(f"{r} ({store.get(f'{PREFIX}/arrived/{r}').decode()})" for r in arrived)
    absent = ", ".join(f"{r} (node {r // per_node})" for r in missing)
    noun = "rank" if len(missing) == 1 else "ranks"
    return (
        f"{len(missing)} of {world} ranks did not reach the rendezvous at {address} within {timeout:g} s: "
        f"{noun} {absent}; arrived: {seen}. Check that those nodes started, can resolve and reach "
        f"{address}, and run the same job (raise {TIMEOUT_ENV} for slow starts)"
    )


def _all_reduce(world: int, device: str, timeout: float, who: str) -> None:
    tensor = torch.ones(1, device=torch.device("cuda") if device == "cuda" else None)
    try:
        work = dist.all_reduce(tensor, async_op=True)
        assert work is not None
        work.wait(timedelta(seconds=timeout))
    except RuntimeError as exc:
        raise PreflightError(
            f"the {who} met but an all-reduce failed within {timeout:g} s: {exc}; check that the nodes "
            "can reach each other (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, firewalls)"
        ) from None
    if int(tensor.item()) != world:
        raise PreflightError(f"the all-reduce over {world} ranks summed to {tensor.item():g}, not {world}")
