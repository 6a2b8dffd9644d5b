"""One site's part of a round: start the train core from the global adapter on the site's own data.

The site's local job spec is loaded as for ``flotilla run``, with the round's settings applied as
overrides (local steps or epochs, ``peft.init_from`` = the received global adapter, a per-round seed).
Training is the unchanged train core (:func:`launcher.train.core.run_training`) in a run directory per round;
a site whose spec asks for several processes is started through its backend (torchrun / DeepSpeed).
Only the trained adapter tensors and scalar metrics come back.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from safetensors.numpy import load_file, save_file

from federated.adapters import trainable_matches
from federated.control_variates import DriftCorrection, round_variates
from federated.optimizer_state import STATE_FILE, CarriedOptimizerState, latest_state
from federated.spec import withheld
from federated.strategy import Update, lora_pairs, lora_product_average
from launcher.backends import get_backend
from launcher.errors import BackendError, FlotillaError
from launcher.plan import Plan, build_plan, load_job
from launcher.redact import redact
from launcher.spec import JobSpec
from launcher.train import run_training

Arrays = dict[str, np.ndarray]


@dataclass
class RoundOrder:
    """What the server asks of a site this round (from the message's ConfigRecord)."""

    server_round: int
    steps: int | None = None
    epochs: float | None = None
    proximal_mu: float = 0.0
    lr_scale: float = 1.0
    frozen_lora_a: bool = False
    keep_local: list[str] = field(default_factory=list)
    logit_adjustment: float = 0.0
    keep_optimizer_state: bool = False
    scaffold: bool = False
    server_step: float = 1.0
    global_rank: int = 8
    global_alpha: float = 16.0
    labels: list[str] = field(default_factory=list)
    seed: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundOrder:
        """Read the keys the server's strategy put in the train ConfigRecord."""
        return cls(
            server_round=int(config["server-round"]),
            steps=int(config["local-steps"]) if "local-steps" in config else None,
            epochs=float(config["local-epochs"]) if "local-epochs" in config else None,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            lr_scale=float(config.get("lr-scale", 1.0)),
            frozen_lora_a=bool(config.get("frozen-lora-a", False)),
            keep_local=[str(pattern) for pattern in config.get("keep-local", [])],
            logit_adjustment=float(config.get("logit-adjustment", 0.0)),
            keep_optimizer_state=bool(config.get("keep-optimizer-state", False)),
            scaffold=bool(config.get("scaffold", False)),
            server_step=float(config.get("server-step", 1.0)),
            global_rank=int(config["lora-rank"]),
            global_alpha=float(config["lora-alpha"]),
            labels=[str(label) for label in config.get("labels", [])],
            seed=int(config.get("seed", 0)),
        )

    def withheld(self, key: str) -> bool:
        """Whether this site keeps tensor ``key`` (FFA-LoRA's A, a personalised tensor)."""
        return withheld(key, self.frozen_lora_a, self.keep_local)


@dataclass
class RoundResult:
    """The site's reply: adapter arrays (same keys as the global adapter) and scalar metrics."""

    arrays: Arrays
    metrics: dict[str, float | int]
    run_dir: Path


def train_local_round(
    job_spec: Path, work_dir: Path, order: RoundOrder, global_arrays: Mapping[str, np.ndarray]
) -> RoundResult:
    """Train this site's adapter for one round, starting from ``global_arrays``."""
    started = time.time()
    run_dir = work_dir / f"round-{order.server_round:03d}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a retried round starts over from the global adapter it was sent
    init_dir = run_dir / "global"
    init_dir.mkdir(parents=True)
    spec = load_job(job_spec, _overrides(order, init_dir, work_dir))
    _check_task(spec, order)
    spec.train.learning_rate *= (
        order.lr_scale
    )  # the federation's schedule over rounds, on the site's own rate
    local_arrays = fit_rank(global_arrays, spec.peft.r, spec.peft.alpha, order, spec.seed)
    if order.keep_local:
        local_arrays = personalised(local_arrays, work_dir, order)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in local_arrays.items()}, init_dir / "adapter_model.safetensors"
    )

    drift = _drift_correction(work_dir, run_dir, order, local_arrays) if order.scaffold else None

    plan = build_plan(spec, run_dir)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(redact(spec.model_dump(mode="json")), sort_keys=False))
    (run_dir / "plan.json").write_text(plan.to_json(), encoding="utf-8")
    _train(run_dir, plan.world_size, plan.backend, order, local_arrays, work_dir, drift)

    summary = json.loads((run_dir / "summary.json").read_text())
    if spec.model.task == "sequence_classification" and summary.get("labels") != order.labels:
        raise FlotillaError(
            f"site labels {summary.get('labels')} differ from the federation's labels {order.labels}: "
            "every site must see every label (the classification head is shared by index)"
        )
    trained = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    ordered = {k: trained[k] for k in global_arrays if k in trained}
    ordered.update({k: v for k, v in trained.items() if k not in ordered})
    report = json.loads((run_dir / "data_report.json").read_text())
    metrics = _metrics(summary, report, spec, time.time() - started)
    return RoundResult(ordered, metrics, run_dir)


def personalised(arrays: Arrays, work_dir: Path, order: RoundOrder) -> Arrays:
    """The global arrays with this site's own personalised tensors, as its latest round trained
    them (the global ones in its first round)."""
    for earlier in range(order.server_round - 1, 0, -1):
        saved = work_dir / f"round-{earlier:03d}" / "adapter" / "adapter_model.safetensors"
        if saved.is_file():
            own = load_file(str(saved))
            return {k: own[k] if order.withheld(k) and k in own else v for k, v in arrays.items()}
    return dict(arrays)


def _overrides(order: RoundOrder, init_dir: Path, work_dir: Path) -> list[str]:
    """The round's settings on top of the site's own job spec."""
    budget = (
        [f"train.max_steps={order.steps}"]
        if order.steps
        else ["train.max_steps=null", f"train.epochs={order.epochs}"]
    )
    labels = [f"data.labels={json.dumps(order.labels)}"] if order.labels else []
    frozen = ["peft.freeze_lora_a=true"] if order.frozen_lora_a else []
    adjusted = [f"train.logit_adjustment={order.logit_adjustment}"] if order.logit_adjustment else []
    return [
        *budget,
        *labels,
        *frozen,
        *adjusted,
        f"peft.init_from={init_dir}",
        f"seed={order.seed + order.server_round}",
        "eval.at_start=true",
        "eval.steps=null",
        "train.early_stopping=null",
        f"output.dir={work_dir}",
    ]


def _check_task(spec: JobSpec, order: RoundOrder) -> None:
    if spec.peft.method != "lora":
        raise FlotillaError("the site's job spec must use peft.method: lora (only adapters are exchanged)")
    if spec.model.task == "sequence_classification" and not order.labels:
        raise FlotillaError("the federation did not send label names for a classification task")
    if order.scaffold and (spec.peft.r, spec.peft.alpha) != (order.global_rank, order.global_alpha):
        raise FlotillaError(
            f"peft.r / peft.alpha: local.scaffold derives the federation's update from consecutive "
            f"global adapters, which needs the federation's rank {order.global_rank} and alpha "
            f"{order.global_alpha:g}; this site's job spec asks for {spec.peft.r} and {spec.peft.alpha:g}"
        )
    if order.frozen_lora_a and spec.peft.r != order.global_rank:
        raise FlotillaError(
            f"peft.r: the federation trains FFA-LoRA (A shared and frozen) at rank {order.global_rank}; "
            f"this site's job spec asks for rank {spec.peft.r}"
        )


def fit_rank(
    global_arrays: Mapping[str, np.ndarray], rank: int, alpha: float, order: RoundOrder, seed: int
) -> Arrays:
    """The global adapter at this site's LoRA rank (unchanged when the ranks agree).

    A site with another rank gets the best rank-``rank`` factors of the global update B·A (SVD),
    rescaled for its ``alpha / rank``. Directions the product does not fill (zero rows of A, e.g. in
    round 1 where B = 0) get a fresh random A row so that they still learn.
    """
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in global_arrays.items()}
    if rank == order.global_rank and alpha == order.global_alpha:
        return arrays
    refit = lora_product_average(
        [Update("global", arrays, 1)],
        rank,
        scales={"global": order.global_alpha / order.global_rank},
        out_scale=alpha / rank,
    )
    generator = np.random.default_rng(seed)
    for a_key, _ in lora_pairs(refit).values():
        a = refit[a_key]
        bound = 1.0 / np.sqrt(a.shape[1])
        empty = ~np.any(a, axis=1)
        a[empty] = generator.uniform(-bound, bound, size=(int(empty.sum()), a.shape[1])).astype(np.float32)
    return refit


class ProximalTerm:
    """FedProx's proximal term mu/2 ||w - w_global||^2 over the adapter weights, added to the local
    loss (FedProx, Li et al. 2020, eq. 2): its gradient goes through the site's optimizer with the
    task loss's, so AdamW's per-parameter scaling applies to it too."""

    def __init__(self, mu: float, anchor: Mapping[str, np.ndarray]) -> None:
        self.mu = mu
        self.anchor = dict(anchor)
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        if self.pairs is None:
            self.pairs = trainable_matches(model, self.anchor)
            if not self.pairs:
                raise FlotillaError("FedProx: no trainable adapter weight matches the global adapter")
        return 0.5 * self.mu * sum(((param - anchor) ** 2).sum() for param, anchor in self.pairs)


def _drift_correction(work_dir: Path, run_dir: Path, order: RoundOrder, arrays: Arrays) -> DriftCorrection:
    """SCAFFOLD's correction for this round, over the tensors the federation shares."""
    shared = {key: value for key, value in arrays.items() if not order.withheld(key)}
    federation, site = round_variates(work_dir, order.server_round, shared, order.server_step)
    return DriftCorrection(federation, site, run_dir)


def _train(
    run_dir: Path,
    world_size: int,
    backend: str,
    order: RoundOrder,
    anchor: Arrays,
    work_dir: Path,
    drift: DriftCorrection | None,
) -> None:
    """The train core in this process, or through the backend when the site uses several processes."""
    console = Console(stderr=True)
    if world_size == 1:
        terms = [ProximalTerm(order.proximal_mu, anchor)] if order.proximal_mu > 0 else []
        carried = (
            [CarriedOptimizerState(latest_state(work_dir, order.server_round), run_dir / STATE_FILE, console)]
            if order.keep_optimizer_state
            else []
        )
        corrected = [drift] if drift is not None else []
        outcome = run_training(run_dir, console, extra_callbacks=[*carried, *corrected], loss_terms=terms)
        if outcome.interrupted:
            raise BackendError(f"local training in {run_dir} was interrupted")
        return
    if order.proximal_mu > 0:
        raise FlotillaError("FedProx needs a single-process site (the proximal term runs in-process)")
    if drift is not None:
        raise FlotillaError("local.scaffold needs a single-process site (the correction runs in-process)")
    if order.keep_optimizer_state:
        console.print(
            f"local.optimizer_state=keep: this site trains in {world_size} processes, where the "
            "optimizer state is not carried (only in-process); it starts fresh each round"
        )
    handle = get_backend(backend).launch(Plan.load(run_dir / "plan.json"), console, wait=True)
    if handle.exit_code:
        raise BackendError(f"local training in {run_dir} ended with exit code {handle.exit_code}")


def _metrics(
    summary: dict[str, Any], report: dict[str, Any], spec: JobSpec, seconds: float
) -> dict[str, float | int]:
    """Scalars for the server: examples, losses and task metrics of the global (before) and local adapter."""
    metrics: dict[str, float | int] = {
        "num-examples": int(report["train_rows"]),
        "steps": int(summary["steps"]),
        "seconds": float(seconds),
        "lora-rank": int(spec.peft.r),
        "lora-alpha": float(spec.peft.alpha),
    }
    for key, value in summary.get("before", {}).items():
        metrics[f"global-{key}"] = float(value)
    for key, value in summary.get("after", {}).items():
        metrics[key] = float(value)
    return metrics
