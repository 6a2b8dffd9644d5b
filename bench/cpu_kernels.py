"""Flotilla's CPU training kernels against torch's, on one packed training step of the real SmolLM2.

Two variants of the same model, batch and step, each timed in a fresh process, alternating:
``torch`` (peft's ``nn.Dropout`` and transformers' cross-entropy) and ``flotilla`` (the train core's
LoRA dropout masks from 16-bit words and its chunked cross-entropy, launcher/model/dropout.py and
launcher/train/cross_entropy.py). Everything else is the train core's: per-document attention and
target-only logits on the first rows of configs/data/realistic_lengths.jsonl, packed into one row;
LoRA r 8 on all linear layers with dropout 0.05; float32; one torch thread. A third variant,
``compiled``, is ``flotilla`` with every decoder layer under ``torch.compile`` (inductor, dynamic
shapes; the per-document attention stays eager, as its document loop would recompile per batch):
the fusion of the elementwise work the issue's profile leaves beside the matrix products.

    python bench/cpu_kernels.py --json bench/results/cpu_kernels.json
    python bench/cpu_kernels.py --variants flotilla compiled --json bench/results/cpu_compile.json
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
VARIANTS = ("torch", "flotilla", "compiled")


def timed_step_seconds(
    variant: str, rows: int, max_length: int, warmup: int, steps: int, batches: int
) -> dict[str, Any]:
    """Seconds per forward + backward of packed batches of ``rows`` rows, in this process: step k
    trains the (k mod ``batches``)-th batch of the file, so ``batches`` > 1 varies the shapes."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from launcher.data.encode import encode_row
    from launcher.model.dropout import CpuFastDropout
    from launcher.model.load import apply_peft, load_model, load_tokenizer
    from launcher.spec.models import ModelSpec, PeftSpec
    from launcher.train import attention
    from launcher.train.attention import use_per_document_attention
    from launcher.train.cross_entropy import use_chunked_loss
    from launcher.train.target_logits import select_target_positions
    from launcher.train.trainer import BatchCollator

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = ModelSpec(path="smollm2-135m-instruct")
    tokenizer = load_tokenizer(spec)
    base = load_model(spec)
    if variant == "compiled":
        attention.per_document_attention = torch.compiler.disable(attention.per_document_attention)
    use_per_document_attention(base)
    use_chunked_loss(base)
    model = apply_peft(base, PeftSpec(), "causal_lm")
    if variant == "torch":
        base.loss_function = ForCausalLMLoss
        for module in model.modules():
            if isinstance(module, CpuFastDropout):
                module.__class__ = torch.nn.Dropout
    if variant == "compiled":
        for layer in base.model.layers:
            layer.compile(dynamic=True)
    model.train()
    lines = ROWS_FILE.read_text().splitlines()
    collate = BatchCollator(tokenizer, "causal_lm", packing=True)
    packed = [
        select_target_positions(
            collate([encode_row(json.loads(line), tokenizer, max_length=max_length) for line in group])
        )
        for group in (lines[k * rows : (k + 1) * rows] for k in range(batches))
    ]
    seconds = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        model(**packed[step % batches]).loss.backward()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "tokens": [int(batch["input_ids"].numel()) for batch in packed],
        "targets": [int(batch["shift_labels"].numel()) for batch in packed],
        # whole turns over varying batches: their mean; one batch: the median, robust to a slow step
        "seconds_per_step": statistics.mean(seconds) if batches > 1 else statistics.median(seconds),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=1, help="distinct batches, trained in turn")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["torch", "flotilla"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and len(args.variants) < 2:
        parser.error("--variants: name at least two, the first is the reference of the ratio")
    shape = (args.rows, args.max_length, args.warmup, args.steps, args.batches)
    if args.child:
        print(json.dumps(timed_step_seconds(args.child, *shape)))
        return 0
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for variant in args.variants if repeat % 2 == 0 else args.variants[::-1]:
            command = [sys.executable, __file__, "--child", variant, "--rows", str(args.rows)]
            command += ["--max-length", str(args.max_length), "--warmup", str(args.warmup)]
            command += ["--steps", str(args.steps), "--batches", str(args.batches)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append({"repeat": repeat, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(f"repeat {repeat} {variant}: {runs[-1]['seconds_per_step']:.2f} s/step", flush=True)
    first, last = args.variants[0], args.variants[-1]
    speedups = [
        next(r for r in runs if r["repeat"] == k and r["variant"] == first)["seconds_per_step"]
        / next(r for r in runs if r["repeat"] == k and r["variant"] == last)["seconds_per_step"]
        for k in range(args.repeats)
    ]
    print(f"{first} ÷ {last} step time: {', '.join(f'{s:.3f}' for s in speedups)}")
    if args.json:
        result = {
            "command": " ".join(["python", "bench/cpu_kernels.py", *(argv or sys.argv[1:])]),
            "runs": runs,
            "speedup_of": f"{first} ÷ {last} seconds per step",
        }
        args.json.write_text(json.dumps({**result, "speedups": speedups}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
