"""Hang diagnosis: a rank that makes no progress for ``resources.hang_timeout`` seconds says where.

Every rank runs a watchdog thread that the Trainer's callbacks feed at each step, evaluation batch,
log and save. When a rank has seen no progress for the timeout it writes its Python stacks (every
thread, :mod:`faulthandler`) and a short record of the call its main thread is in to
``<run dir>/hang/``, waits a moment for the other ranks' records (the run dir is on storage every
rank shares), writes ``hang/diagnosis.txt`` naming each rank and the call it is in, and ends its
process with exit code 1 (a runtime failure: a retry can help). The launcher (torchrun, DeepSpeed,
Ray) then ends the others. A rank that wrote no record within the wait is named as unresponsive: it
is stuck outside Python (a frozen process, a native deadlock) or its node is gone.

A rank whose main thread waits in ``torch.distributed`` (or in backward, where DDP and ZeRO
all-reduce gradients) is a victim; the ranks elsewhere are the stuck ones, named first.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from launcher.atomic import write_json_atomic
from launcher.errors import RUNTIME_FAILURE_EXIT_CODE
from launcher.rundir import HANG_DIAGNOSIS, HANG_FOLDER

#: Where a main thread waiting for its peers sits: a collective, a barrier, a store, backward (DDP
#: and ZeRO all-reduce gradients from autograd hooks, below any Python frame of their own), or DDP's
#: own module (its buffer broadcast before each forward).
COLLECTIVE_MARKERS = (
    "torch/distributed/",
    "deepspeed/comm/",
    "torch/autograd/",
    "torch/nn/parallel/distributed.py",
)


class HangWatchdog(TrainerCallback):
    """Feeds on training progress; past ``timeout`` s without any, diagnoses and ends the process."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout: float) -> None:
        self.folder = run_dir / HANG_FOLDER
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.gather_s = min(30.0, max(5.0, timeout / 2))
        self._last = time.monotonic()
        self._where = "starting training"
        self._done = threading.Event()
        self._main: int | None = None

    def beat(self, where: str) -> None:
        """Progress was made: ``where`` says what the rank last finished."""
        self._last, self._where = time.monotonic(), where

    def __enter__(self) -> HangWatchdog:
        """Start watching the calling thread (the one that trains: a worker thread under Ray);
        with a timeout of 0, nothing is watched."""
        if self.timeout <= 0:
            return self
        for stale in (f"rank-{self.rank}.json", f"rank-{self.rank}.stacks.txt", HANG_DIAGNOSIS):
            if stale != HANG_DIAGNOSIS or self.rank == 0:  # an earlier attempt's, on resume
                (self.folder / stale).unlink(missing_ok=True)
        self._main = threading.current_thread().ident
        self.beat("starting training")
        threading.Thread(target=self._watch, name="flotilla-hang-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle >= self.timeout:
                self._diagnose(idle)

    def _diagnose(self, idle: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"rank-{self.rank}.stacks.txt").open("w", encoding="utf-8") as dump:
            faulthandler.dump_traceback(dump, all_threads=True)
        frame = sys._current_frames().get(self._main or 0)  # the only API for another thread's frame
        stack = traceback.extract_stack(frame) if frame is not None else traceback.StackSummary()
        record = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "idle_seconds": round(idle, 1),
            "last_progress": self._where,
            "call": _innermost_call(stack),
            "waiting_for_peers": any(m in f.filename for f in stack for m in COLLECTIVE_MARKERS),
            "stack": traceback.format_list(stack),
        }
        write_json_atomic(self.folder / f"rank-{self.rank}.json", record)
        records = self._gather()
        text = diagnosis_text(records, self.world_size, self.timeout)
        if self.rank == min(records):
            (self.folder / HANG_DIAGNOSIS).write_text(text, encoding="utf-8")
        sys.stderr.write(f"[rank {self.rank}] {text}")
        sys.stderr.flush()
        os._exit(RUNTIME_FAILURE_EXIT_CODE)  # the main thread is stuck: nothing else can end it

    def _gather(self) -> dict[int, dict[str, Any]]:
        """The ranks' records, waiting up to ``gather_s`` for all of them."""
        deadline = time.monotonic() + self.gather_s
        while True:
            records = {}
            for path in self.folder.glob("rank-*.json"):
                record = json.loads(path.read_text(encoding="utf-8"))
                records[int(record["rank"])] = record
            if len(records) >= self.world_size or time.monotonic() > deadline:
                return records
            time.sleep(0.5)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, c: TrainerControl, **k: Any) -> None:
        self.beat(f"optimizer step {state.global_step}")

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, c: TrainerControl, **k: Any
    ) -> None:
        self.beat(f"a micro-batch of step {state.global_step + 1}")

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, c: TrainerControl, **k: Any
    ) -> None:
        self.beat(f"an evaluation batch at step {state.global_step}")

    def on_save(self, args: TrainingArguments, state: TrainerState, c: TrainerControl, **k: Any) -> None:
        self.beat(f"the checkpoint of step {state.global_step}")

    def on_log(self, args: TrainingArguments, state: TrainerState, c: TrainerControl, **k: Any) -> None:
        self.beat(f"logging at step {state.global_step}")


def _innermost_call(stack: traceback.StackSummary) -> str:
    """``function (file:line)`` of the innermost frame, and the innermost one outside torch that
    led there (which step of training waits: an evaluation, a save, a gradient all-reduce)."""
    frames = [frame for frame in stack if frame.filename != __file__]
    if not frames:
        return "unknown"
    call = f"{frames[-1].name} ({frames[-1].filename}:{frames[-1].lineno})"
    callers = [frame for frame in frames if "/torch/" not in frame.filename]
    if callers and callers[-1] is not frames[-1]:
        call += f", called from {callers[-1].name} ({callers[-1].filename}:{callers[-1].lineno})"
    return call


def diagnosis_text(records: dict[int, dict[str, Any]], world_size: int, timeout: float) -> str:
    """One paragraph: the stuck ranks and their calls first, then those waiting for them."""
    stuck = [r for r in sorted(records) if not records[r]["waiting_for_peers"]]
    waiting = [r for r in sorted(records) if records[r]["waiting_for_peers"]]
    silent = [r for r in range(world_size) if r not in records]
    lines = [f"hang: no training progress for {timeout:g} s (resources.hang_timeout)"]
    for rank in stuck:
        record = records[rank]
        lines.append(
            f"  rank {rank} is stuck in {record['call']} on {record['host']} "
            f"(pid {record['pid']}; last progress: {record['last_progress']})"
        )
    for rank in silent:
        lines.append(
            f"  rank {rank} is unresponsive: it wrote no stacks (frozen, stuck outside Python, or gone)"
        )
    for rank in waiting:
        record = records[rank]
        lines.append(
            f"  rank {rank} waits for its peers in {record['call']} "
            f"(last progress: {record['last_progress']})"
        )
    lines.append(f"  stacks of every thread: {HANG_FOLDER}/rank-<n>.stacks.txt in the run directory")
    return "\n".join(lines) + "\n"
