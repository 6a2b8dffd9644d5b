"""Trackers against the real thing: TensorBoard event files read back with TensorBoard's own reader,
and runs on a real MLflow tracking server (``mlflow server``, SQLite store) read back through
``MlflowClient``: the spec as params, the logged metrics at their steps, the adapter and report as
artefacts, one run per job (global rank 0 only; a resume continues the same run)."""

from __future__ import annotations

import re
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.errors import REQUEUE_EXIT_CODE, FlotillaError
from launcher.rundir import read_jsonl
from launcher.spec import TrackingSpec
from launcher.train import open_trackers
from tests.conftest import flotilla, only_run_dir, start_training, tiny_job


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """Every (step, value) of ``key`` in the run's metrics.jsonl, in order."""
    return [(r["step"], r[key]) for r in read_jsonl(run_dir / "metrics.jsonl") if key in r]


def tracked_job(
    tiny_llama: Path,
    tmp_path: Path,
    tracking: dict[str, Any],
    max_steps: int = 6,
    eval_steps: int = 3,
    **sections: Any,
) -> dict[str, Any]:
    return tiny_job(
        tiny_llama,
        tmp_path,
        train={"max_steps": max_steps, "save_steps": 2},
        eval={"steps": eval_steps, "at_start": False},
        tracking=tracking,
        **sections,
    )


EXPERIMENT = f"tracking-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def two_rank_run(mlflow_server: str, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run on 2 ranks (torchrun, gloo) reporting to TensorBoard and to the MLflow server."""
    folder = tmp_path_factory.mktemp("tracked")
    tracking = {
        "report_to": ["tensorboard", "mlflow"],
        "mlflow_uri": mlflow_server,
        "experiment": EXPERIMENT,
        "run_name": "lr-1e-3",
    }
    spec = folder / "job.yaml"
    spec.write_text(
        yaml.safe_dump(tracked_job(tiny_llama, folder, tracking, resources={"processes_per_node": 2}))
    )
    result = flotilla("run", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(folder / "runs")


def test_tensorboard_event_files_hold_loss_learning_rate_and_eval_metrics_at_their_steps(
    two_rank_run: Path,
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((two_rank_run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's
    events = EventAccumulator(str(two_rank_run / "tensorboard"))
    events.Reload()
    for tag, key in (
        ("train/loss", "loss"),
        ("train/learning_rate", "learning_rate"),
        ("eval/loss", "eval_loss"),
    ):
        expected = logged(two_rank_run, key)
        scalars = [(e.step, e.value) for e in events.Scalars(tag)]
        assert expected and [s for s, _ in scalars] == [s for s, _ in expected], (tag, scalars)
        assert [v for _, v in scalars] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    # evaluations at steps 3 and 6, and the final one (also at step 6)
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6, 6]


def test_one_mlflow_run_on_a_real_server_from_two_ranks_with_spec_metrics_and_artefacts(
    mlflow_server: str, two_rank_run: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 1 logged nothing
    run = runs[0]
    assert run.info.run_name == "lr-1e-3" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.learning_rate"] == "0.001" and params["peft.r"] == "4"
    assert params["resources.processes_per_node"] == "2" and params["name"] == "tiny"
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        # as many values as metrics.jsonl has (rank 1 logged none), at the same steps
        expected = sorted(logged(two_rank_run, key))
        assert [s for s, _ in history] == [s for s, _ in expected], tag
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "report.html", "spec.yaml", "summary.json", "data_report.json"} <= artifacts
    adapter = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "downloaded")))
    weights = "adapter_model.safetensors"
    assert (adapter / weights).read_bytes() == (two_rank_run / "adapter" / weights).read_bytes()


def test_a_run_stopped_for_requeue_and_resumed_continues_its_mlflow_run(
    mlflow_server: str, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    from mlflow import MlflowClient

    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    tracking = {"report_to": ["mlflow"], "mlflow_uri": mlflow_server, "experiment": experiment}
    job = tracked_job(tiny_llama, tmp_path, tracking, max_steps=40, eval_steps=20)
    process, _ = start_training(write_spec(job), tmp_path / "runs")
    process.send_signal(signal.SIGTERM)  # checkpoint, then exit for requeue
    assert process.wait(timeout=120) == REQUEUE_EXIT_CODE
    run_dir = only_run_dir(tmp_path / "runs")
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (stopped,) = client.search_runs([experiment_id])
    assert stopped.info.status == "KILLED"
    stopped_at = max(step for step, _ in logged(run_dir, "loss"))
    assert stopped_at < 40

    resumed = flotilla("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = client.search_runs([experiment_id])
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 41))


def test_tracker_settings_without_their_tracker_and_a_missing_package_are_clear_errors(
    tiny_llama: Path, tmp_path: Path, write_spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(
        tiny_job(tiny_llama, tmp_path, tracking={"report_to": ["tensorboard"], "experiment": "x"})
    )
    result = flotilla("validate", str(spec))
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert re.search(
        r"line \d+: tracking.experiment: .* is set but tracking.report_to does not list mlflow", message
    )
    assert "Traceback" not in result.stderr

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(FlotillaError, match=r"lists mlflow, which is not installed.*flotilla\[tracking\]"):
        open_trackers(TrackingSpec(report_to=["mlflow"]), tmp_path, {}, "job")


def test_an_unreachable_mlflow_server_is_a_clear_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracking = TrackingSpec(report_to=["mlflow"], mlflow_uri=uri)
    with pytest.raises(
        FlotillaError, match=rf"tracking.mlflow_uri {uri}: the MLflow run could not be created"
    ):
        open_trackers(tracking, tmp_path, {"name": "job"}, "job")
