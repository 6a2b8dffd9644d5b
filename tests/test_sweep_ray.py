"""``flotilla sweep --backend ray``: Ray Tune on a real Ray head (127.0.0.1, 2 CPUs, stopped by PID),
two trials at once, each a Ray Train run; ASHA stops the trial whose learning rate diverges."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.backends.ray.cluster import RayHead
from launcher.rundir import read_jsonl
from tests.conftest import flotilla, import_or_unavailable, tiny_job

import_or_unavailable("ray.tune")

MAX_STEPS = 8


def test_asha_stops_the_diverging_trial_before_its_last_step(
    ray_head: RayHead, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    job = tiny_job(
        tiny_llama,
        tmp_path,
        data={"max_train_rows": 32, "max_validation_rows": 8},
        train={"max_steps": MAX_STEPS, "save_steps": 4, "warmup_ratio": 0.0},
        eval={"steps": 2, "at_start": False},
        resources={"backend": "ray", "workers": 1},
    )
    job["ray"] = {"address": ray_head.address, "max_failures": 0}
    # the diverging rate comes last: it starts once a good trial has reached ASHA's rungs
    grid = "train.learning_rate=1e-3,2e-3,3e-3,1.0"
    result = flotilla(
        "sweep", str(write_spec(job)), "--grid", grid, "--backend", "ray", "--max-concurrent", "2",
        "--scheduler", "asha", env={"COLUMNS": "1000"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    sweep_dir = next((tmp_path / "runs" / "tiny").glob("sweep-*"))
    rows = {r["trial"]: r for r in json.loads((sweep_dir / "results.json").read_text())["trials"]}

    diverging = Path(rows["trial-003"]["run_dir"])
    steps = [r["step"] for r in read_jsonl(diverging / "metrics.jsonl") if "loss" in r]
    assert rows["trial-003"]["state"] == "stopped" and max(steps) < MAX_STEPS, steps
    assert not (diverging / "summary.json").exists()
    assert json.loads((diverging / "sweep-stopped.json").read_text())["scheduler"] == "asha"

    finished = [r for r in rows.values() if r["state"] == "finished"]
    assert finished and all(r["steps"] == MAX_STEPS for r in finished)
    best = json.loads((sweep_dir / "results.json").read_text())["best"]
    assert best["trial"] == min(finished, key=lambda r: r["eval_loss"])["trial"]
    manifest = json.loads((Path(best["run_dir"]) / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and "ray" in manifest["packages"]
    assert "Ray Tune: 4 trial(s), at most 2 at once, scheduler asha" in result.stderr
    spans = [
        [r["time"] for r in read_jsonl(Path(rows[name]["run_dir"]) / "metrics.jsonl")]
        for name in ("trial-000", "trial-001")
    ]
    assert spans[0][0] < spans[1][-1] and spans[1][0] < spans[0][-1]  # the first two trained at once
