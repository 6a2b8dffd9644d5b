"""Ray start-up overhead: the same job on the local backend and on Ray Train (``ray.address: local``,
a private Ray started for the run and stopped after), each a fresh ``flotilla run``, alternating.

The job is SmolLM2-135M-Instruct LoRA for a few steps in one process (local) or one Ray worker, so
the difference is Ray's own cost: starting the head, the worker actor, the process group, and
reporting checkpoints.

    python bench/ray_overhead.py [--repeats 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

from compare import (
    REPO,
    SEED,
    alternate,
    flotilla_spec,
    make_workspace,
    run_flotilla,
    start_to_first_step,
)

DATA = REPO / "configs" / "data" / "instructions.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ray start-up overhead against the local backend")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    workspace = make_workspace(args.workdir, threads=1)
    local = flotilla_spec(DATA, 128, 2, SEED, max_steps=args.steps)
    ray = {**local, "resources": {"backend": "ray", "workers": 1}, "ray": {"address": "local"}}
    rows = []
    for repeat in range(args.repeats):
        runs = alternate(
            repeat,
            [partial(run_flotilla, "local", local, workspace), partial(run_flotilla, "ray", ray, workspace)],
        )
        row = {
            side: {"first_step_s": start_to_first_step(run), "wall_s": run.seconds}
            for side, run in zip(("local", "ray"), runs, strict=True)
        }
        rows.append(row)
        print(f"  repeat {repeat + 1}: {json.dumps(row)}", flush=True)
    for measure in ("first_step_s", "wall_s"):
        local_s = statistics.median(r["local"][measure] for r in rows)
        ray_s = statistics.median(r["ray"][measure] for r in rows)
        print(
            f"{measure}: local {local_s:.1f} s, ray {ray_s:.1f} s, "
            f"overhead {ray_s - local_s:+.1f} s ({ray_s / local_s:.2f}x), medians of {len(rows)}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
