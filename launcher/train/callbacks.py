"""Trainer callbacks: metrics.jsonl, checkpoint-and-exit on signals, gradual unfreezing, progress."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from launcher.spec import UnfreezeStage


class MetricsJsonl(TrainerCallback):
    """Append every log record (loss, learning rate, eval metrics) to metrics.jsonl on rank 0."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class CheckpointOnSignal(TrainerCallback):
    """On SIGTERM, SIGUSR1, SIGHUP or SIGINT: finish the current step, save a checkpoint, stop
    training (a second Ctrl-C aborts at once, without the checkpoint).

    Every rank must agree, so the flag is all-reduced at each step end when running distributed.
    A launcher that cannot signal its ranks (Ray Train's workers run the train core in a thread)
    asks by leaving ``stop_file`` (:func:`launcher.rundir.request_stop`), looked for at each step end.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)

    def __init__(self, stop_file: Path | None = None) -> None:
        self.stop_file = stop_file
        self.requested = False
        self.received: int | None = None
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGUSR1 for this process (from its main thread only: Ray Train runs
        the train core in a worker thread, and there Ray owns the process's signals)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers in place for the duration of training, the previous ones back after."""
        self.install()
        try:
            yield
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.received = signum

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._any_rank_requested():
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True

    def _any_rank_requested(self) -> bool:
        if self.stop_file is not None and not self.requested and self.stop_file.exists():
            self.requested = True
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if self.requested else 0.0])
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        return self.requested


class GradualUnfreeze(TrainerCallback):
    """Parameters listed in the schedule train only from their stage's step on.

    They are in the optimizer from the start; before their step they have ``requires_grad=False``,
    so they get no gradient and AdamW leaves them (and their state) untouched.
    """

    def __init__(self, stages: list[tuple[UnfreezeStage, list[torch.nn.Parameter]]]) -> None:
        self.stages = stages

    def apply(self, step: int) -> None:
        """Set ``requires_grad`` of every scheduled parameter for optimizer step ``step``."""
        for stage, params in self.stages:
            for param in params:
                param.requires_grad_(step >= stage.step)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.apply(state.global_step)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.apply(state.global_step)
