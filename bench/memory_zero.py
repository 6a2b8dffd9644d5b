"""Peak memory per rank under DeepSpeed: ZeRO-0 vs 2 vs 3, gradient checkpointing on vs off.

Each configuration is a fresh ``flotilla run`` of a full fine-tune of the real SmolLM2-135M-Instruct
with 2 DeepSpeed ranks on CPU (gloo), micro batch 1 at ``--length`` tokens, for a few steps. The peak
of a rank is its resident-set high-water mark: ``wait4`` on the launcher reports the largest of its
descendants, i.e. the rank that peaked highest. Ratios are against ZeRO-0 without checkpointing
(and, for checkpointing, against the same stage without it), next to what ``flotilla plan``
estimates for the same setup on a GPU.

    python bench/memory_zero.py                 # seq 512 and 1024, 3 steps each (about 10 minutes)
    python bench/memory_zero.py --lengths 512   # one length
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from compare import SEED, flotilla_spec, long_rows, make_workspace, run_flotilla, write_jsonl

STAGES = (0, 2, 3)


def zero_spec(data: Path, length: int, stage: int, checkpointing: bool, steps: int) -> dict[str, Any]:
    """A 2-rank DeepSpeed full fine-tune of SmolLM2 at ``length`` tokens, extras off."""
    spec = flotilla_spec(data, length, 1, SEED, max_steps=steps, gradient_checkpointing=checkpointing)
    spec["peft"] = {"method": "none"}
    spec["train"]["learning_rate"] = 1e-5
    spec["resources"] = {"backend": "deepspeed", "processes_per_node": 2, "zero": {"stage": stage}}
    return spec


def estimated_gib(spec: dict[str, Any]) -> float:
    """``flotilla plan``'s per-GPU estimate of the same setup (bf16 on a GPU)."""
    from launcher.plan.fit import setup_for_spec, shape_for_spec
    from launcher.plan.memory import GIB, estimate
    from launcher.spec.models import JobSpec

    job = JobSpec.model_validate({**spec, "name": "estimate"})
    shape = shape_for_spec(job)
    return estimate(shape, setup_for_spec(job)).total / GIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="peak memory per rank: ZeRO stages and checkpointing")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--workdir", type=Path, help="keep runs and logs here (default: a temp folder)")
    args = parser.parse_args(argv)

    from launcher.model.load import load_tokenizer
    from launcher.spec.models import ModelSpec

    workspace = make_workspace(args.workdir, threads=1)
    tokenizer = load_tokenizer(ModelSpec(path="smollm2-135m-instruct"))
    started = time.time()
    rows: list[dict[str, Any]] = []
    for length in args.lengths:
        data = write_jsonl(
            workspace.root / f"long-{length}.jsonl", long_rows(tokenizer, 2 * args.steps, length)
        )
        for stage in STAGES:
            for checkpointing in (False, True):
                spec = zero_spec(data, length, stage, checkpointing, args.steps)
                run = run_flotilla(f"zero{stage}-gc{int(checkpointing)}-{length}", spec, workspace)
                row = {
                    "length": length,
                    "stage": stage,
                    "checkpointing": checkpointing,
                    "peak_rss_gib": run.peak_rss_gib,
                    "estimate_gpu_gib": estimated_gib(spec),
                    "seconds": run.seconds,
                }
                rows.append(row)
                print(f"  {json.dumps(row)}", flush=True)
    print()
    print(
        f"{'seq':>5} {'ZeRO':>4} {'GC':>4} {'peak/rank GiB':>14} {'vs ZeRO-0':>10} {'GC on/off':>10} {'plan est. GiB':>14}"
    )
    for row in rows:
        reference = next(
            r["peak_rss_gib"]
            for r in rows
            if (r["length"], r["stage"], r["checkpointing"]) == (row["length"], 0, False)
        )
        same_stage = next(
            r["peak_rss_gib"]
            for r in rows
            if (r["length"], r["stage"], r["checkpointing"]) == (row["length"], row["stage"], False)
        )
        print(
            f"{row['length']:>5} {row['stage']:>4} {'on' if row['checkpointing'] else 'off':>4} "
            f"{row['peak_rss_gib']:>14.2f} {row['peak_rss_gib'] / reference:>9.2f}x "
            f"{row['peak_rss_gib'] / same_stage:>9.2f}x {row['estimate_gpu_gib']:>14.2f}"
        )
    print(
        f"\nwall time {time.time() - started:.0f} s; command: python bench/memory_zero.py {' '.join(sys.argv[1:])}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
