"""Flotilla's CPU training kernels against torch's, on one packed training step of the real SmolLM2.

Two variants of the same model, batch and step, each timed in a fresh process, alternating:
``torch`` (peft's ``nn.Dropout`` and transformers' cross-entropy) and ``flotilla`` (the train core's
LoRA dropout masks from 16-bit words and its chunked cross-entropy, launcher/model/dropout.py and
launcher/train/cross_entropy.py). Everything else is the train core's: per-document attention and
target-only logits on the first rows of configs/data/realistic_lengths.jsonl, packed into one row;
LoRA r 8 on all linear layers with dropout 0.05; float32; one torch thread.

    python bench/cpu_kernels.py --json bench/results/cpu_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROWS_FILE = BENCH.parent / "configs" / "data" / "realistic_lengths.jsonl"
VARIANTS = ("torch", "flotilla")


def timed_step_seconds(variant: str, rows: int, max_length: int, warmup: int, steps: int) -> dict[str, Any]:
    """Seconds per forward + backward of one packed batch, in this process."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from launcher.data.encode import encode_row
    from launcher.model.dropout import CpuFastDropout
    from launcher.model.load import apply_peft, load_model, load_tokenizer
    from launcher.spec.models import ModelSpec, PeftSpec
    from launcher.train.attention import use_per_document_attention
    from launcher.train.cross_entropy import use_chunked_loss
    from launcher.train.target_logits import select_target_positions
    from launcher.train.trainer import BatchCollator

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = ModelSpec(path="smollm2-135m-instruct")
    tokenizer = load_tokenizer(spec)
    base = load_model(spec)
    use_per_document_attention(base)
    use_chunked_loss(base)
    model = apply_peft(base, PeftSpec(), "causal_lm")
    if variant == "torch":
        base.loss_function = ForCausalLMLoss
        for module in model.modules():
            if isinstance(module, CpuFastDropout):
                module.__class__ = torch.nn.Dropout
    model.train()
    lines = ROWS_FILE.read_text().splitlines()[:rows]
    features = [encode_row(json.loads(line), tokenizer, max_length=max_length) for line in lines]
    batch = select_target_positions(BatchCollator(tokenizer, "causal_lm", packing=True)(features))
    seconds = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "tokens": int(batch["input_ids"].numel()),
        "targets": int(batch["shift_labels"].numel()),
        "seconds_per_step": statistics.median(seconds),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.rows, args.max_length, args.warmup, args.steps)
    if args.child:
        print(json.dumps(timed_step_seconds(args.child, *shape)))
        return 0
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            command = [sys.executable, __file__, "--child", variant, "--rows", str(args.rows)]
            command += ["--max-length", str(args.max_length), "--warmup", str(args.warmup)]
            command += ["--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append({"repeat": repeat, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(f"repeat {repeat} {variant}: {runs[-1]['seconds_per_step']:.2f} s/step", flush=True)
    speedups = [
        next(r for r in runs if r["repeat"] == k and r["variant"] == "torch")["seconds_per_step"]
        / next(r for r in runs if r["repeat"] == k and r["variant"] == "flotilla")["seconds_per_step"]
        for k in range(args.repeats)
    ]
    print(f"torch ÷ flotilla step time: {', '.join(f'{s:.3f}' for s in speedups)}")
    if args.json:
        result = {
            "command": " ".join(["python", "bench/cpu_kernels.py", *(argv or sys.argv[1:])]),
            "runs": runs,
        }
        args.json.write_text(json.dumps({**result, "speedups": speedups}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
