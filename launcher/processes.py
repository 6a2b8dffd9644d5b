"""Stopping processes Flotilla started, by PID, with everything they started."""

from __future__ import annotations

from collections.abc import Sequence

import psutil


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, parents first (empty when it has ended)."""
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def stop_processes(pids: Sequence[int], timeout: float = 10.0, *, kill: bool = False) -> None:
    """SIGTERM (SIGKILL with ``kill``) each of ``pids``, wait up to ``timeout`` s, then SIGKILL the
    ones still running. Only the given PIDs are signalled; ones already gone are skipped."""
    signalled = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            process.kill() if kill else process.terminate()
            signalled.append(process)
        except psutil.NoSuchProcess:
            continue
    _, remaining = psutil.wait_procs(signalled, timeout=timeout)
    for process in remaining:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(remaining, timeout=timeout)
