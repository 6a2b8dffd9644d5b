"""Ray Train: a ``TorchTrainer`` whose every worker runs the train core, checkpoints reported to Ray.

Ray Train starts the workers, joins them in one process group (gloo on CPU, nccl on GPU) and sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, so the Trainer inside the train core
uses that group as it is. Each verified checkpoint is reported to Ray where it lies (no copy; the
run directory is Ray's experiment directory). When a worker dies, ``FailureConfig(max_failures)``
restarts the whole worker group and the train core resumes from the newest verified checkpoint in
``<run dir>/checkpoints``, as with every backend (also when the worker died before Ray registered
its last report).

A submitted Ray Job runs :func:`drive` through ``python -m launcher.backends.ray <run dir>``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from launcher.backends.ray.cluster import check_resources, check_runtime_env, connect, worker_resources
from launcher.errors import BAD_INPUT_EXIT_CODE, REQUEUE_EXIT_CODE, FlotillaError
from launcher.plan import Plan
from launcher.processes import StopRequests
from launcher.spec import RaySpec
from launcher.train import run_training

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

#: Where a worker leaves a bad-input message (data, model path): retrying cannot fix those.
BAD_INPUT_FILE = "bad_input.txt"


class ReportCheckpoints(TrainerCallback):
    """After the Trainer publishes a verified checkpoint, report it to Ray Train in place.

    ``ray.train.report`` is a barrier: every rank reports, rank 0 attaches the checkpoint.
    """

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        metrics: dict[str, float] = {"step": state.global_step}
        for record in state.log_history:
            metrics.update({k: float(v) for k, v in record.items() if k == "loss" or k.startswith("eval_")})
        checkpoint = Checkpoint.from_directory(str(folder)) if state.is_world_process_zero else None
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD
        )


class ReportEvaluations(TrainerCallback):
    """Under Ray Tune: report every evaluation's ``metric`` with the step, for Tune's scheduler.

    A diverged run's NaN is reported as the worst value (``worst``): a scheduler compares numbers,
    and NaN loses no comparison."""

    def __init__(self, metric: str, worst: float) -> None:
        self.metric = metric
        self.worst = worst

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        import ray.train

        if not metrics or self.metric not in metrics:  # the same keys on every rank: all skip
            return
        value = float(metrics[self.metric])
        ray.train.report({"step": state.global_step, self.metric: self.worst if math.isnan(value) else value})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the train core, unchanged, on the run directory (reporting its
    evaluations too when a Tune trial runs it: ``config["report"]``)."""
    import ray.train  # an optional engine, imported where Ray runs this function

    run_dir = Path(config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    restored = ray.train.get_checkpoint()
    if restored is not None and rank == 0:
        print(f"Ray Train restarted the workers; last reported checkpoint: {restored.path}", file=sys.stderr)
    callbacks: list[TrainerCallback] = [ReportCheckpoints()]
    if config.get("report"):
        callbacks.append(ReportEvaluations(config["report"]["metric"], config["report"]["worst"]))
    try:
        run_training(run_dir, extra_callbacks=callbacks)
    except FlotillaError as exc:
        if exc.retryable:  # an infrastructure fault (a preflight timeout, a failed save): Ray retries
            raise
        # Every rank meets bad input before training starts; finishing (not raising) stops Ray retrying.
        if rank == 0:
            (run_dir / BAD_INPUT_FILE).write_text(str(exc), encoding="utf-8")


def make_trainer(
    plan: Plan, report: dict[str, Any] | None = None, callbacks: list[Any] | None = None
) -> TorchTrainer:
    """The ``TorchTrainer`` for a plan: one worker per rank.

    Ray's experiment directory is the run directory itself, so the checkpoints the Trainer publishes
    in ``checkpoints/`` are reported where they lie; Ray adds only its checkpoint_manager_snapshot.json
    (and checks that every node can reach the directory). ``report`` (metric, worst) makes the
    workers report evaluations; ``callbacks`` are Ray Train's (Tune's report forwarding).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise FlotillaError("the ray backend needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
    # Ray Train's print-to-logger patch swallows output that libraries capture (dill's globals scan
    # in datasets' fingerprinting prints bytecode to the logs); the driver's value reaches the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    spec = plan.job_spec()
    res, settings = spec.resources, spec.ray or RaySpec()
    retries = settings.max_failures
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run_dir": plan.run_dir, "report": report},
        scaling_config=ScalingConfig(
            num_workers=plan.world_size,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=worker_resources(res),
        ),
        run_config=RunConfig(
            name=Path(plan.run_dir).name,
            storage_path=str(Path(plan.run_dir).parent),
            failure_config=FailureConfig(max_failures=retries, controller_failure_limit=retries),
            callbacks=callbacks,
        ),
    )


def fit(plan: Plan, console: Console) -> int:
    """Run Ray Train on the connected cluster; 0 finished, 85 stopped early, 2 bad input, 1 failed."""
    from ray.train import TrainingFailedError

    run_dir = Path(plan.run_dir)
    bad_input = run_dir / BAD_INPUT_FILE
    bad_input.unlink(missing_ok=True)
    try:
        make_trainer(plan).fit()
    except TrainingFailedError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        console.print("[red]Ray Train gave up:[/]", escape("\n".join(lines[-20:])))
        return 1
    if bad_input.is_file():
        console.print("[red]error:[/]", escape(bad_input.read_text(encoding="utf-8")))
        return BAD_INPUT_EXIT_CODE
    return 0 if (run_dir / "summary.json").is_file() else REQUEUE_EXIT_CODE


def fit_for_tune(run_dir: Path, metric: str, mode: str, callback: Any) -> None:
    """A Tune trial's Ray Train run of ``run_dir``; raises when it fails (Tune records the error)."""
    plan = Plan.load(run_dir / "plan.json")
    bad_input = run_dir / BAD_INPUT_FILE
    bad_input.unlink(missing_ok=True)
    worst = math.inf if mode == "min" else -math.inf
    make_trainer(plan, report={"metric": metric, "worst": worst}, callbacks=[callback]).fit()
    if bad_input.is_file():
        raise FlotillaError(bad_input.read_text(encoding="utf-8"))


def drive(
    plan: Plan,
    address: str,
    console: Console,
    runtime_env: dict[str, Any] | None,
    stop: StopRequests | None = None,
) -> int:
    """Connect, check the cluster can hold the job, run Ray Train to the end, disconnect; exit code.

    ``stop`` takes the stop signals back from ``ray.init`` (which sets its own SIGTERM handler)."""
    connect(address, runtime_env)
    if stop is not None:
        stop.install()
    import ray  # an optional engine: only on the path of a Ray run

    try:
        check_resources(plan, address)
        check_runtime_env(runtime_env or {})
        return fit(plan, console)
    finally:
        ray.shutdown()
