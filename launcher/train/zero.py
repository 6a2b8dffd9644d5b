"""ZeRO-aware pieces of the train core: evaluating once the DeepSpeed engine exists, and gathering
ZeRO-3 partitioned weights before a save (so that an adapter can never be saved empty)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class EvaluateAtTrainBegin(TrainerCallback):
    """Run ``evaluate`` when training begins, once: the Trainer cannot evaluate under DeepSpeed
    before its engine exists (ZeRO 0-2 refuse, ZeRO-3 breaks the later training engine)."""

    def __init__(self, evaluate: Callable[[], dict[str, float]]) -> None:
        self.evaluate = evaluate
        self.result: dict[str, float] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.result is None:
            self.result = self.evaluate()


def is_zero3(trainer: Trainer) -> bool:
    """True when the trainer's DeepSpeed engine partitions the parameters (ZeRO stage 3)."""
    engine = getattr(trainer, "deepspeed", None)
    return engine is not None and bool(engine.zero_optimization_partition_weights())


@contextmanager
def gathered(params: list[torch.nn.Parameter], enabled: bool) -> Iterator[None]:
    """Inside, every rank holds the full ``params`` (a collective under ZeRO-3; a no-op otherwise)."""
    if not enabled:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def consolidated_state_dict(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """Every weight, gathered layer by layer onto rank 0's CPU (``None`` on the other ranks).

    A collective under ZeRO-3: every rank must call it."""
    return trainer.deepspeed._zero3_consolidated_16bit_state_dict()  # type: ignore[union-attr]
