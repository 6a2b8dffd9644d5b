"""Reliability, measured through the real CLI: kill -9 mid-run, stop signals per backend, a frozen rank.

    python bench/reliability.py --json bench/results/reliability.json [--repeats 5]
    python bench/reliability.py --print bench/results/reliability.json     # the RESULTS.md tables

1. kill -9 at a random step, then ``flotilla run --resume``, ``--repeats`` times, locally (1 process)
   and under ZeRO-3 (2 gloo ranks): the largest difference of any logged loss from the uninterrupted
   run's, and the final adapter's largest difference.
2. SIGTERM to ``flotilla run`` (local, torchrun with 2 ranks, the DeepSpeed launcher with 2 ranks, a
   private Ray head) and to ``flotilla fed simulate``: the exit code and the processes of the job left.
3. A rank frozen by SIGSTOP under ``resources.hang_timeout: 6``: seconds until the diagnosis file.

The job is the tests' tiny Llama (2 layers, SmolLM2's tokenizer) on the shipped instructions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.processes import process_tree  # noqa: E402 (after the path)
from tests.conftest import losses, only_run_dir, processes_left, rank_pids, tiny_job, wait_for  # noqa: E402
from tests.tiny_models import build_tiny_llama  # noqa: E402

ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
}
STEPS = 24


def job(model: Path, out: Path, **resources: Any) -> dict[str, Any]:
    """The tests' tiny job, ``STEPS`` steps, a checkpoint every 3, writing under ``out``."""
    train = {"max_steps": STEPS, "save_steps": 3, "warmup_ratio": 0.05}
    return tiny_job(model, out, train=train, resources=resources, output={"dir": str(out)})


def start(args: list[str], log: Path) -> subprocess.Popen[str]:
    with log.open("a") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", *args],
            cwd=REPO,
            env=ENV,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )


def adapter(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def kill9_and_resume(
    model: Path, root: Path, resources: dict[str, Any], repeats: int, seed: int
) -> dict[str, Any]:
    """Uninterrupted once, then ``repeats`` runs killed with SIGKILL at a random step and resumed."""
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "job.yaml"
    spec.write_text(yaml.safe_dump(job(model, root / "whole", **resources)))
    whole = start(["run", str(spec)], root / "whole.log")
    assert whole.wait() == 0, (root / "whole.log").read_text()[-3000:]
    reference_dir = only_run_dir(root / "whole")
    reference, reference_adapter = losses(reference_dir), adapter(reference_dir)
    rng = random.Random(seed)
    trials = []
    for trial in range(repeats):
        out = root / f"killed-{trial}"
        spec.write_text(yaml.safe_dump(job(model, out, **resources)))
        kill_at = rng.randint(4, STEPS - 4)
        log = root / f"killed-{trial}.log"
        process = start(["run", str(spec)], log)
        wait_for(lambda out=out: list(out.glob("tiny/*/metrics.jsonl")), 300, "training")
        run_dir = only_run_dir(out)
        wait_for(lambda d=run_dir, at=kill_at: max(losses(d), default=0) >= at, 300, f"step {kill_at}")
        tree = process_tree(process.pid)
        for pid in tree:  # kill -9 of every process of the job at once, as a node failure does
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        process.wait()
        resumed = start(["run", "--resume", str(run_dir)], log)
        code = resumed.wait()
        got = losses(run_dir)
        loss_gap = max(abs(got[step] - reference[step]) for step in reference)
        weights = adapter(run_dir)
        weight_gap = max(float((weights[k] - reference_adapter[k]).abs().max()) for k in reference_adapter)
        trials.append(
            {
                "killed_at_step": kill_at,
                "resume_exit": code,
                "max_loss_gap": loss_gap,
                "max_weight_gap": weight_gap,
            }
        )
        print(
            f"  {resources or 'local'}: killed at step {kill_at}, resumed: loss gap {loss_gap:.2e}",
            flush=True,
        )
    return {"resources": resources, "steps": STEPS, "trials": trials}


def sigterm(root: Path, name: str, args: list[str], started: Callable[[], Any]) -> dict[str, Any]:
    """SIGTERM to the CLI once ``started()`` holds: its exit code and the job's processes left."""
    log = root / f"sigterm-{name}.log"
    process = start(args, log)
    wait_for(started, 400, f"{name} to train")
    time.sleep(1.0)
    tree = process_tree(process.pid)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=300)
    time.sleep(1.0)
    left = processes_left(tree)
    print(f"  SIGTERM {name}: exit {code}, {len(tree)} processes, {len(left)} left", flush=True)
    return {"exit_code": code, "processes": len(tree), "left": len(left)}


def stop_signals(model: Path, root: Path) -> dict[str, Any]:
    results = {}
    backends = {
        "local, 1 process": {},
        "torchrun, 2 ranks": {"processes_per_node": 2},
        "DeepSpeed launcher, 2 ranks": {
            "backend": "deepspeed",
            "processes_per_node": 2,
            "zero": {"stage": 2},
        },
        "Ray, private head": {"backend": "ray", "workers": 1},
    }
    for name, resources in backends.items():
        out = root / f"term-{len(results)}"
        spec = root / f"term-{len(results)}.yaml"
        body = job(model, out, **resources)
        body["train"].update(max_steps=400, save_steps=1000)
        if resources.get("backend") == "ray":
            body["ray"] = {"address": "local"}
        spec.write_text(yaml.safe_dump(body))

        def training(out: Path = out) -> bool:
            return any('"loss"' in f.read_text() for f in out.glob("tiny/*/metrics.jsonl"))

        results[name] = sigterm(root, name, ["run", str(spec)], training)
    fed_out = root / "fed"
    sites = fed_out / "fed-sentiment" / "sites"
    results["fed simulate"] = sigterm(
        root,
        "fed simulate",
        [
            "fed",
            "simulate",
            str(REPO / "configs" / "federated.yaml"),
            "rounds=3",
            "local.steps=2",
            f"output={fed_out}",
        ],
        lambda: list(sites.glob("*/round-001/plan.json")),
    )
    return results


def frozen_rank(model: Path, root: Path) -> dict[str, Any]:
    """Seconds from SIGSTOP of rank 1 to the diagnosis, with hang_timeout 6 s."""
    out = root / "hang"
    spec = root / "hang.yaml"
    body = job(model, out, processes_per_node=2, hang_timeout=6)
    body["train"].update(max_steps=400, save_steps=1000)
    spec.write_text(yaml.safe_dump(body))
    process = start(["run", str(spec)], root / "hang.log")
    wait_for(
        lambda: any('"loss"' in f.read_text() for f in out.glob("tiny/*/metrics.jsonl")), 300, "training"
    )
    tree = process_tree(process.pid)
    rank_1 = rank_pids(tree)["1"]
    frozen = time.monotonic()
    psutil.Process(rank_1).suspend()
    diagnosis = only_run_dir(out) / "hang" / "diagnosis.txt"
    wait_for(diagnosis.is_file, 300, "the diagnosis")
    seconds = time.monotonic() - frozen
    psutil.Process(rank_1).resume()
    code = process.wait(timeout=300)
    print(f"  frozen rank: diagnosed after {seconds:.1f} s, exit {code}", flush=True)
    return {
        "hang_timeout": 6,
        "seconds_to_diagnosis": seconds,
        "exit_code": code,
        "left": len(processes_left(tree)),
        "diagnosis": diagnosis.read_text(),
    }


def markdown(results: dict[str, Any]) -> str:
    """The RESULTS.md tables of a saved run."""
    lines = [
        "| kill -9 at a random step, then `--resume` | runs | steps killed at | resume exit codes "
        "| largest loss gap | largest adapter gap |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (("kill9_local", "local, 1 process"), ("kill9_zero3", "ZeRO-3, 2 gloo ranks")):
        trials = results[key]["trials"]
        lines.append(
            f"| {label} | {len(trials)} | {', '.join(str(t['killed_at_step']) for t in trials)} "
            f"| {', '.join(str(t['resume_exit']) for t in trials)} "
            f"| {max(t['max_loss_gap'] for t in trials):.1e} | {max(t['max_weight_gap'] for t in trials):.1e} |"
        )
    lines += [
        "",
        "| SIGTERM to the CLI | exit code | processes of the job | left after |",
        "|---|---|---|---|",
    ]
    for name, row in results["sigterm"].items():
        lines.append(f"| {name} | {row['exit_code']} | {row['processes']} | {row['left']} |")
    frozen = results["frozen_rank"]
    lines += [
        "",
        f"A frozen rank (SIGSTOP, `hang_timeout: {frozen['hang_timeout']}`): diagnosed after "
        f"{frozen['seconds_to_diagnosis']:.1f} s, exit {frozen['exit_code']}, {frozen['left']} processes left.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--print", type=Path, metavar="JSON", help="print the tables of a saved run")
    args = parser.parse_args(argv)
    if args.print:
        print(markdown(json.loads(args.print.read_text())))
        return 0
    root = Path(tempfile.mkdtemp(prefix="flotilla-reliability-"))
    model = build_tiny_llama(root / "tiny-llama")
    results: dict[str, Any] = {"repeats": args.repeats, "seed": args.seed}
    print("kill -9 and resume", flush=True)
    results["kill9_local"] = kill9_and_resume(model, root / "k-local", {}, args.repeats, args.seed)
    zero3 = {"backend": "deepspeed", "processes_per_node": 2, "zero": {"stage": 3}}
    results["kill9_zero3"] = kill9_and_resume(model, root / "k-zero3", zero3, args.repeats, args.seed)
    print("stop signals", flush=True)
    results["sigterm"] = stop_signals(model, root)
    print("a frozen rank", flush=True)
    results["frozen_rank"] = frozen_rank(model, root)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
