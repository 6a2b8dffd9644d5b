"""Checkpoint sealing and resume verification: rank 0 hashing everything vs the ranks sharing it.

    python bench/checkpoint_hashing.py --json bench/results/checkpoint_hashing.json

First a real job makes the checkpoint: SmolLM2-135M, full fine-tune (``peft.method: none``) under
ZeRO-3 on 2 gloo ranks through ``flotilla run``, one optimizer step, one checkpoint (fp32 weights,
Adam states, ZeRO shards). Then, on that folder, with the page cache warm for both sides, alternating:

- before: one process hashes every file (what rank 0 did while the other ranks waited in a barrier;
  on resume every rank did it);
- after: ``--ranks`` processes each hash their byte-balanced share at once (``hash_share``), the wall
  time is the slowest one's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.train.checkpoint import file_hashes, hash_share  # noqa: E402 (after the path)


def make_checkpoint(folder: Path) -> Path:
    """Run the real 2-rank ZeRO-3 full fine-tune and return its checkpoint folder."""
    spec = {
        "name": "hashing",
        "seed": 7,
        "model": {"path": "smollm2-135m-instruct"},
        "data": {
            "train": str(REPO / "configs" / "data" / "instructions.jsonl"),
            "validation_ratio": 0.0,
            "max_length": 256,  # SmolLM2's chat template adds a system prompt to every row
            "max_train_rows": 8,
        },
        "peft": {"method": "none"},
        "train": {"learning_rate": 1e-5, "micro_batch_size": 1, "max_steps": 1, "save_steps": 1},
        "eval": {"at_start": False},
        "resources": {"backend": "deepspeed", "processes_per_node": 2, "zero": {"stage": 3}},
        "output": {"dir": str(folder / "runs")},
    }
    spec_file = folder / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "run", str(spec_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"the job failed:\n{done.stderr[-3000:]}")
    (checkpoint,) = (folder / "runs").glob("hashing/*/checkpoints/checkpoint-1")
    return checkpoint


def _share(args: tuple[Path, int, int]) -> float:
    folder, rank, world = args
    started = time.perf_counter()
    hash_share(folder, rank, world)
    return time.perf_counter() - started


def measure(checkpoint: Path, ranks: int, repeats: int) -> dict[str, Any]:
    """Wall seconds of both sides, ``repeats`` times each, alternating."""
    before, after = [], []
    file_hashes(checkpoint)  # warm the page cache for both sides
    with multiprocessing.get_context("fork").Pool(ranks) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            file_hashes(checkpoint)
            before.append(time.perf_counter() - started)
            started = time.perf_counter()
            pool.map(_share, [(checkpoint, rank, ranks) for rank in range(ranks)])
            after.append(time.perf_counter() - started)
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "ranks": ranks,
        "before_s": before,
        "after_s": after,
        "ratio_median": statistics.median(before) / statistics.median(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flotilla-hashing-") as scratch:
        result = measure(make_checkpoint(Path(scratch)), args.ranks, args.repeats)
    result["command"] = " ".join(["python", "bench/checkpoint_hashing.py", *sys.argv[1:]])
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
