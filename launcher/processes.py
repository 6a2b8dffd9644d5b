"""Starting and stopping processes Flotilla started, by PID, with everything they started."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

import psutil

from launcher.errors import REQUEUE_EXIT_CODE

#: Signals that stop a job (SIGUSR1 is Slurm's warning before the time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
#: What every process of the job gets at the first, second and later stop signal: SIGUSR1 first,
#: which the launchers ignore and the ranks answer by checkpointing and exiting 85 (so no launcher
#: kills its ranks mid-save); a second stop makes the launchers end their ranks; a third kills all.
ESCALATION = (signal.SIGUSR1, signal.SIGTERM, signal.SIGKILL)
#: In the environment of a job's processes, 1 for ``flotilla run --quiet``: the train core shows no
#: progress bar and no data lines, only warnings and errors.
QUIET_ENV = "FLOTILLA_QUIET"


class StopRequests:
    """SIGTERM, SIGINT, SIGHUP and SIGUSR1 to this process as a request to stop the job it drives.

    The first calls ``first`` with the signal (ask the job to checkpoint and stop: a Ray driver
    leaves a stop request for its workers); a second raises KeyboardInterrupt, so ``finally`` blocks
    stop what was started (a private Ray head). Engines that take SIGTERM over when they connect
    (``ray.init`` does) get it back by :meth:`install` again. Main thread only; the previous
    handlers are restored on exit.
    """

    def __init__(self, first: Callable[[int], None]) -> None:
        self.first = first
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take the stop signals (again)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def __enter__(self) -> StopRequests:
        self.install()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        self.first(signum)


def run_process_group(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` and wait until every process of the job it starts has ended.

    The job stays in this process's group, so a signal to the whole group (a terminal's Ctrl-C, a
    ``kill -9`` of the group) reaches it too; its processes are tracked as they appear, including
    ranks in sessions of their own (torchrun starts each rank in a new session). A stop signal sent
    to this process alone is passed to every process of the job as :data:`ESCALATION` says, and the
    exit code is then 85 ("requeue me"); otherwise it is the command's own (a death by signal N as
    128 + N). The launchers inherit SIGUSR1 as ignored: only the training processes handle it.
    Signals are only taken over from the main thread.
    """
    signalled: list[int] = []
    job: dict[int, psutil.Process] = {}
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if in_main else {}
    if in_main:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited through exec by the launchers
    child = subprocess.Popen(list(command), env=dict(env) if env is not None else None)

    def forward(signum: int, frame: object) -> None:
        signalled.append(signum)
        sent = ESCALATION[min(len(signalled), len(ESCALATION)) - 1]
        job.update(_processes(process_tree(child.pid)))
        for process in job.values():
            with contextlib.suppress(psutil.Error):
                process.send_signal(sent)  # checks the PID still is the process seen, not a reuse

    try:
        for sig in previous:
            signal.signal(sig, forward)
        while child.poll() is None:
            job.update(_processes(process_tree(child.pid)))
            time.sleep(0.2)
        while any(_running(p) for p in job.values()):
            time.sleep(0.2)  # the launcher may end before its ranks do
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = child.returncode
    if signalled:
        return REQUEUE_EXIT_CODE
    return code if code >= 0 else 128 - code


def _processes(pids: Sequence[int]) -> dict[int, psutil.Process]:
    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found[pid] = psutil.Process(pid)
    return found


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
