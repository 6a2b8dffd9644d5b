"""``flotilla sweep`` locally: a 4-trial grid on the tiny model, interrupted and re-run (finished
trials are not trained again), the results table and best run; every trial validated up front."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launcher.cli import main
from launcher.errors import BAD_INPUT_EXIT_CODE, REQUEUE_EXIT_CODE
from launcher.rundir import read_jsonl
from launcher.spec import SweepSpec, parse_dimension
from launcher.sweep.space import trial_params
from tests.conftest import flotilla, start_flotilla, tiny_job, wait_for

WIDE = {"COLUMNS": "1000"}
GRID = ["--grid", "train.learning_rate=1e-4,3e-3", "--grid", "peft.r=2,4"]


def sweep_job(model: Path, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """The tiny job, short: 4 steps, an evaluation every 2."""
    return tiny_job(
        model,
        tmp_path,
        data={"max_train_rows": 32, "max_validation_rows": 8},
        train={"max_steps": 4, "save_steps": 2},
        eval={"steps": 2, "at_start": False},
        **sections,
    )


def files_and_mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_an_interrupted_sweep_continues_without_retraining_and_names_the_best(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = write_spec(sweep_job(tiny_llama, tmp_path))
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = start_flotilla("sweep", str(spec), *GRID, env=WIDE, stdout=out, stderr=subprocess.STDOUT)
    try:
        trials = wait_for(lambda: list(tmp_path.glob("runs/tiny/sweep-*/trials")), 120, "the sweep")[0]
        wait_for(lambda: read_jsonl(trials / "trial-001" / "metrics.jsonl"), 300, "trial-001 to train")
        first.send_signal(signal.SIGTERM)  # trial-001 checkpoints and the sweep stops for a re-run
        assert first.wait(120) == REQUEUE_EXIT_CODE, log.read_text()[-3000:]
    finally:
        first.kill()
    assert (trials / "trial-000" / "summary.json").is_file()
    assert not (trials / "trial-001" / "summary.json").is_file()
    assert not (trials / "trial-002").exists()
    done_before = files_and_mtimes(trials / "trial-000")

    again = flotilla("sweep", str(spec), *GRID, env=WIDE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert files_and_mtimes(trials / "trial-000") == done_before  # not trained again, not touched
    assert "1 already done (skipped)" in again.stderr
    assert "resuming from" in again.stderr  # trial-001 went on from its checkpoint
    steps_001 = [r["step"] for r in read_jsonl(trials / "trial-001" / "metrics.jsonl") if "loss" in r]
    assert steps_001[-1] == 4 and len(steps_001) < 2 * 4

    sweep_dir = trials.parent
    results = json.loads((sweep_dir / "results.json").read_text())
    rows = results["trials"]
    assert [r["state"] for r in rows] == ["finished"] * 4
    assert [(r["train.learning_rate"], r["peft.r"]) for r in rows] == [
        (1e-4, 2),
        (1e-4, 4),
        (3e-3, 2),
        (3e-3, 4),
    ]
    finals = {}
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert row["eval_loss"] == summary["after"]["eval_loss"]
        plan = json.loads((Path(row["run_dir"]) / "plan.json").read_text())
        assert plan["spec"]["train"]["learning_rate"] == row["train.learning_rate"]
        assert plan["spec"]["peft"]["r"] == row["peft.r"]
        finals[row["trial"]] = row["eval_loss"]
    best = min(finals, key=finals.__getitem__)
    assert results["best"]["trial"] == best
    assert (sweep_dir / "best_run.txt").read_text().strip() == str(sweep_dir / "trials" / best)
    with (sweep_dir / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["trial"] for r in table] == list(finals)
    assert math.isclose(float(table[0]["eval_loss"]), finals["trial-000"])
    assert "<polyline" in (sweep_dir / "comparison.html").read_text()

    status = flotilla("status", str(sweep_dir), env=WIDE)
    assert status.returncode == 0 and status.stdout.count("SUCCEEDED") == 5, status.stdout  # header + 4


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            ["--grid", "train.learning_rat=1e-4,3e-4"],
            "train.learning_rat: unknown key; did you mean 'learning_rate'?",
        ),
        (["--grid", "train.learning_rate=1e-4,2.0"], "train.learning_rate: 2.0 is not allowed"),
        (["--grid", "peft.r="], "the grid of peft.r is empty"),
        (
            ["--space", "train.learning_rate=logunifrom(1e-5,1e-3)", "--random", "2"],
            "unknown distribution 'logunifrom'; did you mean 'loguniform'?",
        ),
        (["--grid", "peft.r=2,4", "--metric", "eval_los"], "did you mean 'eval_loss'?"),
        (["--grid", "peft.r=2,4", "--scheduler", "asha"], "use sweep.backend: ray"),
    ],
)
def test_bad_sweeps_are_refused_before_anything_starts(
    options: list[str], expected: str, tiny_llama: Path, tmp_path: Path, write_spec, capsys
) -> None:
    spec = write_spec(sweep_job(tiny_llama, tmp_path))
    assert main(["sweep", str(spec), *options]) == BAD_INPUT_EXIT_CODE
    message = " ".join(capsys.readouterr().err.split())
    assert expected in message, message
    assert not (tmp_path / "runs").exists()


def test_the_trial_that_refuses_a_value_is_named(
    tiny_llama: Path, tmp_path: Path, write_spec, capsys
) -> None:
    spec = write_spec(sweep_job(tiny_llama, tmp_path))
    assert main(["sweep", str(spec), "--grid", "train.learning_rate=1e-4,2.0"]) == BAD_INPUT_EXIT_CODE
    message = " ".join(capsys.readouterr().err.split())
    assert "in trial-001 (train.learning_rate=2.0)" in message and "trial-000" not in message


def test_the_sweep_section_in_the_spec_is_read(tiny_llama: Path, tmp_path: Path, write_spec, capsys) -> None:
    job = sweep_job(tiny_llama, tmp_path, sweep={"grid": {"peft.r": [2, 4]}, "metric": "eval_accuracy"})
    assert main(["sweep", str(write_spec(job))]) == BAD_INPUT_EXIT_CODE
    assert "'eval_accuracy' is not a metric that evaluation produces" in " ".join(
        capsys.readouterr().err.split()
    )
    assert main(["validate", str(write_spec(job))]) == BAD_INPUT_EXIT_CODE  # flotilla validate checks it too


def test_random_samples_are_seeded_and_within_their_bounds() -> None:
    sweep = SweepSpec(
        grid={"peft.r": [4, 8]},
        space={"train.learning_rate": "loguniform(1e-5,1e-3)", "train.warmup_steps": "randint(0,3)"},
        random=5,
    )
    trials = trial_params(sweep, seed=3)
    assert trials == trial_params(sweep, seed=3) != trial_params(sweep, seed=4)
    assert len(trials) == 10 and [t["peft.r"] for t in trials] == [4] * 5 + [8] * 5
    assert all(1e-5 <= t["train.learning_rate"] <= 1e-3 for t in trials)
    assert {t["train.warmup_steps"] for t in trials} <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="low must be below high"):
        parse_dimension("uniform(0.5,0.1)")
