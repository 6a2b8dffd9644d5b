"""Experiment trackers (TensorBoard, MLflow): one tracker run per job, written by one process only.

Flotilla drives the trackers' own clients (``torch.utils.tensorboard.SummaryWriter``,
``mlflow.MlflowClient``) instead of transformers' ``TensorBoardCallback``/``MLflowCallback``: those log
``TrainingArguments`` rather than the job spec, start a new MLflow run in every process start (a
resume, a Slurm requeue or a Ray restart would split one job over several runs), log no chosen
artefacts, and need a Trainer, which the federation's server does not have. Here the MLflow run's id
is kept in the record directory (``tracking.json``) and every restart continues the same run;
TensorBoard purges the steps after the checkpoint a run resumed from. wandb goes through
transformers' own integration (``report_to``).
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from launcher.atomic import write_json_atomic
from launcher.errors import FlotillaError
from launcher.redact import redact
from launcher.spec import TrackingSpec

#: The record of a tracker run, in the run (or federation work) directory.
RECORD = "tracking.json"
#: MLflow refuses longer parameter values.
MLFLOW_PARAM_LIMIT = 6000
#: The packages each tracker needs, and the extra that installs them.
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


class Tracker(Protocol):
    """One tracker's run."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifacts(self, paths: list[Path]) -> None: ...

    def close(self, status: str) -> None: ...


class TensorBoardTracker:
    """Scalars in ``<record dir>/tensorboard``; a resumed run purges the steps after ``resume_step``."""

    def __init__(self, log_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_artifacts(self, paths: list[Path]) -> None:
        """TensorBoard holds scalars only; the artefacts stay in the run directory."""

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per job: created once (params = the job spec), continued by every restart."""

    def __init__(self, tracking: TrackingSpec, record: dict[str, Any], params: Mapping[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient(tracking_uri=tracking.mlflow_uri)
        previous = record.get("mlflow")
        try:
            if previous and previous.get("tracking_uri") == self.client.tracking_uri:
                self.run_id: str = previous["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self._create_run(record, params)
        except MlflowException as exc:
            raise FlotillaError(
                f"tracking.mlflow_uri {self.client.tracking_uri}: the MLflow run could not be "
                f"{'continued' if previous else 'created'}: {exc}"
            ) from exc
        record["mlflow"] = {"tracking_uri": self.client.tracking_uri, "run_id": self.run_id}

    def _create_run(self, record: dict[str, Any], params: Mapping[str, str]) -> str:
        """A new run in the record's experiment (created if missing), with ``params`` logged."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        name = record["experiment"]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:  # another job may have created it meanwhile
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        run = self.client.create_run(
            experiment_id, run_name=record["run_name"], tags={"flotilla.record": record["dir"]}
        )
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=items[start : start + 100])
        return run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """Every tracker a job reports to (none on processes other than the one that logs)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log the numeric values of ``metrics`` at ``step``."""
        numeric = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if numeric:
            for tracker in self.trackers:
                tracker.log_metrics(numeric, step)

    def finish(self, artifacts: list[Path], status: str = "FINISHED") -> None:
        """Upload ``artifacts`` (those that exist) and close every tracker run with ``status``."""
        for tracker in self.trackers:
            tracker.log_artifacts([p for p in artifacts if p.exists()])
            tracker.close(status)
        self.trackers = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        """A job that raised closes its tracker runs as ``FAILED``."""
        if kind is not None:
            self.abort("FAILED")

    def abort(self, status: str) -> None:
        """Close every tracker run with ``status`` (``KILLED`` for a run stopped to be requeued)."""
        for tracker in self.trackers:
            tracker.close(status)
        self.trackers = []


def open_trackers(
    tracking: TrackingSpec,
    record_dir: Path,
    params: Mapping[str, Any],
    experiment: str,
    resume_step: int | None = None,
) -> Trackers:
    """The trackers ``tracking`` asks for, writing into (or continuing) the record in ``record_dir``.

    ``params`` is the job spec (flattened to key paths, secrets redacted, as MLflow params);
    ``experiment`` the default experiment name. Call on the one process that logs."""
    wanted = [name for name in tracking.report_to if name in PACKAGES]
    missing = [name for name in wanted if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise FlotillaError(
            f"tracking.report_to lists {', '.join(missing)}, which is not installed here: "
            "pip install 'flotilla[tracking]' (or remove it from tracking.report_to)"
        )
    if not wanted:
        return Trackers([])
    path = record_dir / RECORD
    record: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    record.update(
        dir=str(record_dir.resolve()),
        experiment=tracking.experiment or experiment,
        run_name=tracking.run_name or record.get("run_name") or record_dir.name,
    )
    trackers: list[Tracker] = []
    if "tensorboard" in wanted:
        trackers.append(TensorBoardTracker(record_dir / "tensorboard", resume_step))
    if "mlflow" in wanted:
        trackers.append(MlflowTracker(tracking, record, flat_params(params)))
    write_json_atomic(path, record)
    return Trackers(trackers)


def flat_params(value: Mapping[str, Any]) -> dict[str, str]:
    """``{"train.learning_rate": "0.0002", ...}``: a nested spec as key paths, secrets redacted."""
    return {key: _param_text(item) for key, item in _flatten(redact(dict(value)), "")}


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MLFLOW_PARAM_LIMIT]


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / :`` and spaces."""
    return "".join(c if c.isalnum() or c in "_-./: " else "_" for c in key)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def rewrite_trainer_logs(logs: Mapping[str, Any]) -> dict[str, float]:
    """Trainer log keys as transformers' own trackers name them: ``eval_loss`` -> ``eval/loss``,
    ``test_*`` -> ``test/*``, anything else -> ``train/*`` (``loss`` -> ``train/loss``)."""
    rewritten = {}
    for key, value in logs.items():
        if not _is_number(value):
            continue
        for prefix in ("eval_", "test_"):
            if key.startswith(prefix):
                rewritten[f"{prefix[:-1]}/{key[len(prefix) :]}"] = float(value)
                break
        else:
            rewritten[f"train/{key}"] = float(value)
    return rewritten


class TrackerCallback(TrainerCallback):
    """Every Trainer log record to the job's trackers, from the world's process zero."""

    def __init__(self, trackers: Trackers) -> None:
        self.trackers = trackers

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and logs:
            self.trackers.log_metrics(rewrite_trainer_logs(logs), state.global_step)
