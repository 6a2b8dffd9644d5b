"""Sweeps on Ray Tune: every trial is a Ray Train run (the train core in Ray Train workers) that
reports its evaluations to Tune, whose scheduler (ASHA, median stopping) ends losing trials early.

A trial is a Tune function trainable that fits the trial's ``TorchTrainer`` with Ray's
``TuneReportCallback``: what the workers report through ``ray.train.report`` reaches Tune. Tune's
own state goes to ``<sweep dir>/tune``; each trial trains in its own run directory, as a Ray run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from launcher.backends.ray.cluster import RayHead, connect, is_jobs_address, worker_resources
from launcher.errors import FlotillaError
from launcher.plan import Plan
from launcher.redact import restore_secrets
from launcher.spec import RaySpec

#: What Tune's schedulers count: the Trainer's global step, reported with every evaluation.
TIME_ATTR = "step"


@dataclass(frozen=True)
class TuneRequest:
    """What a sweep asks of Tune."""

    plans: list[Plan]
    metric: str
    mode: str
    scheduler: str
    max_concurrent: int | None
    tune_dir: Path


def tune_trials(request: TuneRequest, console: Console) -> dict[str, str]:
    """Run every plan as a Tune trial on the spec's Ray cluster (``local``: a private head); each
    run directory -> ``finished``, ``stopped`` (by the scheduler) or ``failed: <why>``."""
    first = request.plans[0].job_spec()
    settings = first.ray or RaySpec()
    if is_jobs_address(settings.address):
        raise FlotillaError(
            "a Ray sweep drives Tune from this process: set ray.address to the cluster's host:port or "
            "'auto' (not the Jobs API address), or 'local' for a private Ray"
        )
    runtime_env = dict(settings.runtime_env)
    if isinstance(runtime_env.get("env_vars"), dict):  # plan.json keeps no secret: take them from here
        runtime_env["env_vars"] = restore_secrets(runtime_env["env_vars"], "ray.runtime_env.env_vars")
    import ray  # an optional engine: only on the path of a Ray sweep

    head = None
    address = settings.address
    if address == "local":
        per_trial = request.plans[0].world_size * first.resources.cpus_per_worker
        cpus = settings.num_cpus or per_trial * (request.max_concurrent or 1)
        console.print(f"starting a private Ray head on 127.0.0.1 with {cpus} CPUs")
        head = RayHead.start(cpus)
        address = head.address
    try:
        connect(address, runtime_env or None)
        return _fit(request, console)
    finally:
        ray.shutdown()
        if head is not None:
            head.stop()


def _fit(request: TuneRequest, console: Console) -> dict[str, str]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    # A report at a checkpoint may come before the first evaluation (no metric yet): the
    # schedulers skip such results; Tune's strict check would fail the trial.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    spec = request.plans[0].job_spec()
    every = spec.eval.steps or 1
    longest = max((p.job_spec().train.max_steps or 10**9) for p in request.plans)
    schedulers = {
        "asha": lambda: ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=max(longest, every),
            grace_period=every,
            reduction_factor=2,
            stop_last_trials=False,  # the last step's report must not stop the final save
        ),
        "median": lambda: MedianStoppingRule(time_attr=TIME_ATTR, grace_period=every, min_samples_required=2),
        "none": FIFOScheduler,
    }
    run_dirs = [p.run_dir for p in request.plans]
    concurrent = request.max_concurrent or _room(request.plans[0])
    console.print(
        f"Ray Tune: {len(run_dirs)} trial(s), at most {concurrent} at once, scheduler {request.scheduler}"
    )
    tuner = tune.Tuner(
        # The trial only drives its Ray Train run: the workers hold the CPUs and GPUs. Tune refuses a
        # trial that asks for nothing, so it asks for one byte of memory.
        tune.with_resources(run_trial, {"memory": 1}),
        param_space={"run_dir": tune.grid_search(run_dirs), "metric": request.metric, "mode": request.mode},
        tune_config=tune.TuneConfig(
            metric=request.metric,
            mode=request.mode,
            scheduler=schedulers[request.scheduler](),
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(request.tune_dir.parent), verbose=0, log_to_file=True
        ),
    )
    started = time.monotonic()
    grid = tuner.fit()
    console.print(f"Ray Tune finished after {time.monotonic() - started:.1f} s")
    outcomes: dict[str, str] = {}
    for result in grid:
        run_dir = Path(result.config["run_dir"])
        if (run_dir / "summary.json").is_file():
            outcomes[str(run_dir)] = "finished"
        elif result.error is not None:
            lines = [line for line in str(result.error).splitlines() if line.strip()]
            outcomes[str(run_dir)] = f"failed: {lines[-1] if lines else 'unknown'}"
            console.print(f"[red]{run_dir.name} failed:[/]", escape("\n".join(lines[-5:])))
        else:
            outcomes[str(run_dir)] = "stopped"
    return outcomes


def _room(plan: Plan) -> int:
    """How many trials of ``plan``'s size the connected cluster holds at once (at least one)."""
    import ray

    need = worker_resources(plan.job_spec().resources)
    slots = 0
    for node in ray.nodes():
        if node.get("Alive"):
            have = node["Resources"]
            per = min(int(have.get(k, 0) // v) for k, v in need.items())
            slots += per
    return max(1, slots // plan.world_size)


def run_trial(config: dict[str, Any]) -> None:
    """One Tune trial: the trial's Ray Train run (resumed from its last verified checkpoint when
    the run directory has one), its evaluations forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from launcher.backends.ray.workers import fit_for_tune  # transformers: in the trial's process

    fit_for_tune(Path(config["run_dir"]), config["metric"], config["mode"], TuneReportCallback())
