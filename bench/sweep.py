"""Sweeps measured on the shipped instruction data with SmolLM2-135M-Instruct (LoRA, CPU).

1. Overhead: the same learning-rate grid as ``flotilla sweep`` (local, one process) and by hand (one
   ``flotilla run ... train.learning_rate=X`` per trial), the data prepared once beforehand for both;
   the trials' final eval_loss must agree (same seed, same runs).
2. ASHA: a wider grid on Ray Tune (a private 2-CPU head, 2 trials at once), the full grid against
   ``--scheduler asha``: wall time, time to the best trial's end, steps trained, trials stopped.

    python bench/sweep.py [--only overhead asha] [--trials 4] [--steps 6] [--json bench/results/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from compare import REPO, SEED, machine, make_workspace

DATA = REPO / "configs" / "data"
OVERHEAD_RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
ASHA_RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


def job(root: Path, steps: int, every: int | None, cache: Path) -> dict[str, Any]:
    """LoRA on the shipped instructions, evaluated on 16 validation rows (every ``every`` steps)."""
    return {
        "name": "sweep-bench",
        "seed": SEED,
        "model": {"path": "smollm2-135m-instruct"},
        "data": {
            "train": str(DATA / "instructions.jsonl"),
            "validation": str(DATA / "instructions_val.jsonl"),
            "max_length": 128,
            "max_validation_rows": 16,
            "cache_dir": str(cache),
        },
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "learning_rate": 1e-3,
            "micro_batch_size": 4,
            "max_steps": steps,
            "warmup_ratio": 0.0,
            "save_steps": every or steps,
        },
        "eval": {"steps": every, "at_start": False},
        "output": {"dir": str(root / "runs")},
    }


def timed(command: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``command``; its wall time (it must succeed)."""
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log}")
    return seconds


def final_loss(run_dir: Path) -> float:
    return float(json.loads((run_dir / "summary.json").read_text())["after"]["eval_loss"])


def overhead(workspace: Any, trials: int, steps: int) -> dict[str, Any]:
    root = workspace.root / "overhead"
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "job.yaml"
    spec.write_text(yaml.safe_dump(job(root, steps, None, workspace.root / "data-cache"), sort_keys=False))
    cli, env = workspace.flotilla, workspace.env
    timed([*cli, "preprocess", str(spec)], env, root / "preprocess.log")  # both sides read this cache
    rates = OVERHEAD_RATES[:trials]
    by_hand = []
    for rate in rates:
        seconds = timed(
            [*cli, "run", str(spec), f"train.learning_rate={rate}"], env, root / f"run-{rate}.log"
        )
        by_hand.append(seconds)
        print(f"  by hand lr={rate}: {seconds:.1f} s", flush=True)
    hand_runs = sorted(
        p for p in (root / "runs" / "sweep-bench").iterdir() if not p.name.startswith("sweep-")
    )
    grid = "train.learning_rate=" + ",".join(str(r) for r in rates)
    sweep_s = timed([*cli, "sweep", str(spec), "--grid", grid], env, root / "sweep.log")
    print(f"  sweep: {sweep_s:.1f} s", flush=True)
    (sweep_dir,) = (root / "runs" / "sweep-bench").glob("sweep-*")
    rows = json.loads((sweep_dir / "results.json").read_text())["trials"]
    differences = [abs(row["eval_loss"] - final_loss(run)) for row, run in zip(rows, hand_runs, strict=True)]
    again_s = timed([*cli, "sweep", str(spec), "--grid", grid], env, root / "sweep-again.log")
    return {
        "trials": trials,
        "steps": steps,
        "by_hand_s": [round(s, 2) for s in by_hand],
        "by_hand_total_s": round(sum(by_hand), 2),
        "sweep_s": round(sweep_s, 2),
        "overhead_s": round(sweep_s - sum(by_hand), 2),
        "overhead_per_trial_s": round((sweep_s - sum(by_hand)) / trials, 2),
        "rerun_all_done_s": round(again_s, 2),
        "max_eval_loss_difference": max(differences),
        "eval_loss": {str(r["train.learning_rate"]): r["eval_loss"] for r in rows},
    }


def ray_sweep(workspace: Any, scheduler: str, steps: int, every: int, rates: list[float]) -> dict[str, Any]:
    root = workspace.root / f"ray-{scheduler}"
    root.mkdir(parents=True, exist_ok=True)
    spec_data = job(root, steps, every, workspace.root / "data-cache")
    spec_data["resources"] = {"backend": "ray", "workers": 1}
    spec_data["ray"] = {"address": "local", "num_cpus": 2, "max_failures": 0}
    spec = root / "job.yaml"
    spec.write_text(yaml.safe_dump(spec_data, sort_keys=False))
    grid = "train.learning_rate=" + ",".join(str(r) for r in rates)
    command = [*workspace.flotilla, "sweep", str(spec), "--grid", grid, "--backend", "ray"]
    command += ["--max-concurrent", "2", "--scheduler", scheduler]
    started = time.time()
    wall = timed(command, workspace.env, root / "sweep.log")
    (sweep_dir,) = (root / "runs" / "sweep-bench").glob("sweep-*")
    results = json.loads((sweep_dir / "results.json").read_text())
    best = results["best"]
    best_end = (Path(best["run_dir"]) / "summary.json").stat().st_mtime
    rows = results["trials"]
    summary = {
        "scheduler": scheduler,
        "wall_s": round(wall, 2),
        "time_to_best_s": round(best_end - started, 2),
        "best_trial": best["trial"],
        "best_learning_rate": next(r["train.learning_rate"] for r in rows if r["trial"] == best["trial"]),
        "best_eval_loss": best["eval_loss"],
        "steps_trained": sum(r["steps"] for r in rows),
        "stopped": [r["trial"] for r in rows if r["state"] == "stopped"],
        "trials": [
            {
                k: r[k]
                for k in ("trial", "state", "train.learning_rate", "eval_loss", "best_eval_loss", "steps")
            }
            for r in rows
        ],
    }
    print(f"  ray {scheduler}: {json.dumps({k: v for k, v in summary.items() if k != 'trials'})}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="flotilla sweep: overhead and ASHA against the full grid")
    parser.add_argument("--only", nargs="+", choices=["overhead", "asha"], default=["overhead", "asha"])
    parser.add_argument("--trials", type=int, default=4, help="trials of the overhead grid")
    parser.add_argument("--steps", type=int, default=6, help="steps of each overhead trial")
    parser.add_argument("--asha-steps", type=int, default=12)
    parser.add_argument("--asha-every", type=int, default=3, help="eval.steps (ASHA's rungs)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    workspace = make_workspace(args.workdir, threads=1)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    if "overhead" in args.only:
        result["overhead"] = overhead(workspace, args.trials, args.steps)
        o = result["overhead"]
        print(
            f"overhead: sweep {o['sweep_s']:.1f} s vs by hand {o['by_hand_total_s']:.1f} s for {o['trials']} "
            f"trials ({o['overhead_per_trial_s']:+.1f} s per trial); re-run with all done {o['rerun_all_done_s']:.1f} s; "
            f"eval_loss differences up to {o['max_eval_loss_difference']:.2g}"
        )
    if "asha" in args.only:
        full = ray_sweep(workspace, "none", args.asha_steps, args.asha_every, ASHA_RATES)
        asha = ray_sweep(workspace, "asha", args.asha_steps, args.asha_every, ASHA_RATES)
        result["asha"] = {"full_grid": full, "asha": asha}
        print(
            f"ASHA: time to best {asha['time_to_best_s']:.1f} s vs full grid {full['time_to_best_s']:.1f} s; "
            f"wall {asha['wall_s']:.1f} s vs {full['wall_s']:.1f} s; steps {asha['steps_trained']} vs "
            f"{full['steps_trained']}; best {asha['best_trial']} vs {full['best_trial']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
