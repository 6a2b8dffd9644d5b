"""End-to-end runs of the train core through the CLI on a tiny Llama: loss, saves, resume, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from launcher.errors import REQUEUE_EXIT_CODE
from tests.conftest import (
    assert_adapter_reloads_equal,
    flotilla,
    loss_log,
    losses,
    only_run_dir,
    processes_left,
    rank_pids,
    start_flotilla,
    start_training,
    tiny_job,
    wait_for,
)


def test_tiny_run_learns_and_saves_a_reloadable_adapter(tiny_llama: Path, tmp_path: Path, write_spec) -> None:
    spec = write_spec(tiny_job(tiny_llama, tmp_path, eval={"steps": 4}))
    result = flotilla("run", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["after"]["eval_perplexity"] < summary["before"]["eval_perplexity"]
    for name in ("spec.yaml", "plan.json", "manifest.json", "data_report.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 7 and "torch" in manifest["packages"] and manifest["data_fingerprints"]

    assert_adapter_reloads_equal(tiny_llama, run_dir)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_llama: Path, tmp_path: Path, write_spec) -> None:
    steps = {"max_steps": 8, "save_steps": 3, "logging_steps": 1}
    reference_spec = write_spec(tiny_job(tiny_llama, tmp_path / "ref", train=steps), "ref.yaml")
    assert flotilla("run", str(reference_spec)).returncode == 0
    reference = losses(only_run_dir(tmp_path / "ref" / "runs"))

    spec = write_spec(tiny_job(tiny_llama, tmp_path / "killed", train=steps), "killed.yaml")
    process = start_flotilla("run", str(spec))
    root = tmp_path / "killed" / "runs" / "tiny"
    deadline = time.time() + 300
    while time.time() < deadline and not list(
        root.glob("*/checkpoints/checkpoint-3/flotilla-checkpoint.json")
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_dir = only_run_dir(tmp_path / "killed" / "runs")
    assert not (run_dir / "summary.json").exists()
    saved = max(
        int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoints/*/flotilla-checkpoint.json")
    )
    logged_before = len(loss_log(run_dir))
    resumed = flotilla("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint-{saved}" in resumed.stdout + resumed.stderr  # it said where it resumed from
    assert "data: reused in" in resumed.stderr, "the resumed run reads the prepared data, never re-tokenizes"
    after_resume = [step for step, _ in loss_log(run_dir)[logged_before:]]
    assert after_resume == list(range(saved + 1, 9)), "the resumed run starts after its last checkpoint"
    resumed_losses = losses(run_dir)
    assert max(resumed_losses) == 8
    for step in range(4, 9):
        assert abs(resumed_losses[step] - reference[step]) <= 1e-6, (
            step,
            resumed_losses[step],
            reference[step],
        )


@pytest.mark.parametrize(
    ("stop", "processes", "launcher"),
    [
        (signal.SIGHUP, 1, {}),
        (signal.SIGTERM, 2, {}),
        (signal.SIGTERM, 2, {"backend": "deepspeed", "zero": {"stage": 2}}),
    ],
    ids=["SIGHUP-in-process", "SIGTERM-torchrun-2-ranks", "SIGTERM-deepspeed-launcher-2-ranks"],
)
def test_a_stop_signal_to_the_cli_checkpoints_every_rank_exits_85_and_leaves_no_process(
    tiny_llama: Path, tmp_path: Path, write_spec, stop: signal.Signals, processes: int, launcher: dict
) -> None:
    spec = write_spec(
        tiny_job(
            tiny_llama,
            tmp_path,
            train={"max_steps": 400, "save_steps": 1000},
            resources={"processes_per_node": processes, **launcher},
        )
    )
    process, job = start_training(spec, tmp_path / "runs")
    assert len(job) >= (2 + processes if processes > 1 else 1), job  # the CLI, torchrun's agent, its ranks
    process.send_signal(stop)  # to the CLI's PID only, as a scheduler or `kill` sends it
    assert process.wait(timeout=120) == REQUEUE_EXIT_CODE
    run_dir = only_run_dir(tmp_path / "runs")
    checkpoints = list((run_dir / "checkpoints").glob("checkpoint-*/flotilla-checkpoint.json"))
    assert len(checkpoints) == 1
    assert not (run_dir / "summary.json").exists()
    left = processes_left(job)
    assert left == [], f"processes of the job left running: {left}"


def test_early_stopping_saves_the_best_checkpoints_weights_not_the_last(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    from safetensors.torch import load_file

    from launcher.rundir import read_jsonl

    train = {"max_steps": 12, "learning_rate": 3e-2, "warmup_ratio": 0.0, "scheduler": "constant"}
    early = {"metric": "eval_loss", "mode": "min", "patience": 100}  # never stops: best != last below
    spec = write_spec(
        tiny_job(tiny_llama, tmp_path, train={**train, "early_stopping": early}, eval={"steps": 2})
    )
    result = flotilla("run", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "early stopping is disabled" not in result.stderr, "a misleading warning: it is enabled"
    run_dir = only_run_dir(tmp_path / "runs")
    evaluations = {
        r["step"]: r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r
    }
    best = min(evaluations, key=evaluations.__getitem__)
    assert best < max(evaluations), f"the validation loss kept falling, nothing to choose: {evaluations}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_checkpoint"].endswith(f"checkpoint-{best}")
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    at_best = load_file(str(run_dir / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors"))
    assert saved.keys() == at_best.keys()
    for key, value in saved.items():
        assert torch.equal(value, at_best[key]), key
    assert abs(summary["after"]["eval_loss"] - evaluations[best]) < 1e-4


def test_a_frozen_rank_is_diagnosed_the_job_fails_and_no_process_is_left(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    """Rank 1 is frozen (SIGSTOP: stuck outside Python, as in a native deadlock) mid-training: rank 0
    blocks in the gradient all-reduce; after resources.hang_timeout its watchdog writes its stacks,
    names rank 1 as unresponsive and itself as waiting for its peers, and the job fails (1)."""
    spec = write_spec(
        tiny_job(
            tiny_llama,
            tmp_path,
            train={"max_steps": 400, "save_steps": 1000},
            resources={"processes_per_node": 2, "hang_timeout": 6},
        )
    )
    log = tmp_path / "cli.log"
    process, job = start_training(spec, tmp_path / "runs", stdout=log.open("w"), stderr=subprocess.STDOUT)
    run_dir = only_run_dir(tmp_path / "runs")
    wait_for(lambda: losses(run_dir), 300, "the first training step")  # mid-training, not evaluating
    rank_1 = rank_pids(job)["1"]
    started = time.monotonic()
    psutil.Process(rank_1).suspend()
    diagnosis = run_dir / "hang" / "diagnosis.txt"
    while time.monotonic() - started < 120 and not diagnosis.is_file():
        time.sleep(0.2)
    diagnosed_after = time.monotonic() - started
    psutil.Process(rank_1).resume()  # so that the launcher's SIGTERM reaches it at once
    code = process.wait(timeout=120)
    output = log.read_text()
    assert code == 1, output[-3000:]
    assert 6 <= diagnosed_after < 60, diagnosed_after
    text = diagnosis.read_text()
    assert "rank 1 is unresponsive" in text, text
    assert "rank 0 waits for its peers in" in text, text
    assert "rank 1 is unresponsive" in " ".join(output.split()), output[-3000:]  # the CLI says it too
    record = json.loads((run_dir / "hang" / "rank-0.json").read_text())
    # where DDP waits for a peer: a collective, backward (gradient all-reduce hooks), its buffer broadcast
    waits = ("torch/distributed/", "torch/autograd/", "torch/nn/parallel/distributed.py")
    assert record["waiting_for_peers"] and any(w in "".join(record["stack"]) for w in waits), record
    assert "Thread" in (run_dir / "hang" / "rank-0.stacks.txt").read_text()  # every thread's stack
    left = processes_left(job)
    assert left == [], f"processes of the job left running: {left}"
