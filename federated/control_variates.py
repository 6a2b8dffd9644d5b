"""SCAFFOLD's drift correction at a site (``local.scaffold: true``), with no extra bytes on the wire.

SCAFFOLD (Karimireddy et al. 2020) corrects every local step by ``c - c_i``: ``c`` estimates the
update direction of all sites, ``c_i`` this site's own, so each site moves as the federation would
rather than towards its own optimum. Its usual form sends ``c`` with the model and ``c_i``'s change
back, doubling the bytes of a round. Under full participation with a weighted-mean server step
(FedAvg, FedProx, FedAvgM without momentum) both are determined by what the site already has
(option II of the paper, per unit of learning rate):

    c_i(t)  = c_i(t-1) - c(t-1) + (x(t-1) - y_i(t-1)) / S_i(t-1)
    c(t)    = (x(t-1) - x(t)) / (eta_s * S(t-1))

with ``x(t)`` the global adapter received in round t, ``y_i`` the one the site trained, ``S`` the sum
of the learning rates over the round's optimizer steps and ``eta_s`` the server's step on the mean
update (``x(t) = x(t-1) - eta_s * sum_j w_j (x(t-1) - y_j)``). ``c(t)`` is then the sites' weighted
mean of ``(x - y_j) / S`` when every site trains the same steps at the same rates (``S_j = S``), as
the federation's ``local.steps`` and ``lr_schedule`` make them; a site with other rates gets an
approximate ``c``. After each optimizer step the parameters move by ``-lr * (c - c_i)``, as NVIDIA
FLARE's ``PTScaffoldHelper.model_update`` does; the step counts in ``S``. The state never leaves the
site: each round dir keeps the ``c`` and ``c_i`` it trained with and its ``S``. A site that missed
the previous round (or has no state) trains that round uncorrected and starts over from zero.

Why not a kept implementation: Flower ships none in its strategies, and FLARE's helper needs the
FLARE runtime and sends the variates; the correction itself is the few lines below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from federated.adapters import trainable_matches
from launcher.atomic import write_json_atomic
from launcher.errors import FlotillaError

#: Files a round's run dir keeps for the site's next round (never sent).
VARIATES_FILE = "control-variates.safetensors"
STEPS_FILE = "control-variates.json"
_SITE, _GLOBAL = "site.", "global."


def round_variates(
    work_dir: Path, server_round: int, received: Mapping[str, np.ndarray], server_step: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(c, c_i)`` for ``server_round`` over the keys of ``received`` (the global adapter of this
    round): zero in the site's first round, or when it did not train the round before."""
    zero = {key: np.zeros_like(value, dtype=np.float32) for key, value in received.items()}
    previous = work_dir / f"round-{server_round - 1:03d}"
    paths = [
        previous / VARIATES_FILE,
        previous / STEPS_FILE,
        previous / "global" / "adapter_model.safetensors",
        previous / "adapter" / "adapter_model.safetensors",
    ]
    if server_round < 2 or not all(path.is_file() for path in paths):
        return zero, dict(zero)
    variates, lr_sum = load_file(str(paths[0])), json.loads(paths[1].read_text())["lr_sum"]
    started_from, trained = load_file(str(paths[2])), load_file(str(paths[3]))
    if lr_sum <= 0:
        return zero, dict(zero)
    missing = [
        key
        for key in received
        if not {_SITE + key, _GLOBAL + key} <= variates.keys()
        or key not in started_from
        or key not in trained
    ]
    if missing:
        raise FlotillaError(
            f"local.scaffold: {previous} holds no state for {len(missing)} of this round's adapter "
            f"tensors (e.g. {missing[0]}); did the site's job spec change between rounds?"
        )
    federation, site = {}, {}
    for key, now in received.items():
        before = started_from[key].astype(np.float64)
        federation[key] = ((before - now) / (server_step * lr_sum)).astype(np.float32)
        site[key] = (
            variates[_SITE + key] - variates[_GLOBAL + key] + (before - trained[key]) / lr_sum
        ).astype(np.float32)
    return federation, site


class DriftCorrection(TrainerCallback):
    """After each optimizer step, moves every shared adapter weight by ``-lr * (c - c_i)`` and adds
    ``lr`` to the round's ``S``; at the end writes ``c``, ``c_i`` and ``S`` to ``run_dir``."""

    def __init__(
        self, federation: Mapping[str, np.ndarray], site: Mapping[str, np.ndarray], run_dir: Path
    ) -> None:
        self.federation = dict(federation)
        self.site = dict(site)
        self.run_dir = run_dir
        self.correction = {key: federation[key] - site[key] for key in federation}
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None
        self.lr_sum = 0.0

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        if self.pairs is None:
            self.pairs = [(p, c) for p, c in trainable_matches(model, self.correction) if bool(c.any())]
        lr = float(optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            for param, correction in self.pairs:
                param.add_(correction, alpha=-lr)
        self.lr_sum += lr

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tensors = {_SITE + k: v for k, v in self.site.items()}
        tensors.update({_GLOBAL + k: v for k, v in self.federation.items()})
        partial = self.run_dir / f".{VARIATES_FILE}.partial"
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(partial))
        partial.replace(self.run_dir / VARIATES_FILE)
        write_json_atomic(self.run_dir / STEPS_FILE, {"lr_sum": self.lr_sum})
