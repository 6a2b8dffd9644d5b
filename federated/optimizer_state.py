"""A site's optimizer state carried from one round to its next (``local.optimizer_state: keep``).

Without it every round starts a fresh AdamW: its first steps are nearly sign steps of size
``lr`` for every weight (the moments are estimated from one gradient), which is most of a short
round. Kept, a site's moments follow its own gradients across rounds, as pooled training's do.
The state never leaves the site: it is written to the round's run dir and read by its next round.

transformers' Trainer restores an optimizer only from a checkpoint of the same run; a round
is a new run started from the global adapter, so this callback loads the moments itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from launcher.errors import FlotillaError

#: The optimizer state a round leaves in its run dir for the site's next round.
STATE_FILE = "optimizer-state.pt"


def latest_state(work_dir: Path, server_round: int) -> Path | None:
    """The state the site's latest earlier round left, if any (none in its first round)."""
    for earlier in range(server_round - 1, 0, -1):
        saved = work_dir / f"round-{earlier:03d}" / STATE_FILE
        if saved.is_file():
            return saved
    return None


class CarriedOptimizerState(TrainerCallback):
    """Loads the moments of ``source`` (if given) into the new optimizer at the start of training
    and writes the optimizer's state to ``target`` at its end.

    Only the per-parameter state (AdamW's step count and moments) is carried; the learning rate
    and the other hyper-parameters stay this round's, so the federation's schedule over rounds holds.
    """

    def __init__(self, source: Path | None, target: Path, console: Console) -> None:
        self.source = source
        self.target = target
        self.console = console

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.source is None or optimizer is None:
            return
        saved = torch.load(self.source, map_location="cpu", weights_only=True)
        current = optimizer.state_dict()
        problem = _mismatch(saved, current, optimizer)
        if problem:
            raise FlotillaError(
                f"local.optimizer_state=keep: {self.source} does not fit this round's optimizer "
                f"({problem}); did the site's job spec change between rounds?"
            )
        optimizer.load_state_dict({"state": saved["state"], "param_groups": current["param_groups"]})
        self.console.print(f"optimizer state carried over from {self.source.parent.name}")

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is None:
            return
        staging = self.target.with_name(self.target.name + ".tmp")
        torch.save(optimizer.state_dict(), staging)
        os.replace(staging, self.target)


def _mismatch(saved: dict[str, Any], current: dict[str, Any], optimizer: Any) -> str | None:
    """Why ``saved`` cannot be this optimizer's state, or ``None``."""
    saved_groups = [len(group["params"]) for group in saved["param_groups"]]
    current_groups = [len(group["params"]) for group in current["param_groups"]]
    if saved_groups != current_groups:
        return f"parameter groups of {saved_groups} parameters, this round has {current_groups}"
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, moments in saved["state"].items():
        for name, value in moments.items():
            if value.dim() and value.shape != params[int(index)].shape:
                return f"{name} of parameter {index} is {tuple(value.shape)}, the parameter {tuple(params[int(index)].shape)}"
    return None
