"""Tokens/s and MFU of the train core on one GPU: a ~1.1B Llama-shaped model (random weights, built
from a config), full fine-tuning and LoRA in bf16, each a fresh ``flotilla run``.

MFU = k · N · tokens/s ÷ peak, with N the model's parameters (tied embeddings counted once),
k = 6 for full fine-tuning (forward 2N, backward 4N) and 4 for LoRA (the frozen weights need no
weight gradient), and the peak the GPU's datasheet dense bf16 FLOP/s (``DATASHEET_BF16_TFLOPS``, or
``--peak-tflops`` for a GPU not listed), as MFU is defined; the bf16 FLOP/s of a large matmul
measured in the same run is reported beside it. Every row is truncated to exactly ``--seq`` tokens,
so every token of every batch is a real one.

    python bench/gpu_mfu.py                         # on a GPU machine: ~1.1B, seq 2048
    python bench/gpu_mfu.py --size tiny --device cpu --steps 4 --seq 128   # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from compare import REPO, SEED, flotilla_spec, make_workspace, run_flotilla

sys.path.insert(0, str(REPO))  # the tests' random-model builder (tests/ is not installed)
from launcher.model import load_tokenizer
from launcher.spec import ModelSpec
from tests.tiny_models import build_random_llama

#: (hidden, intermediate, layers, attention heads, key/value heads): TinyLlama's ~1.1B shape.
SIZES = {"1b": (2048, 5632, 22, 32, 4), "tiny": (128, 352, 2, 4, 2)}
#: Dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets, by a part of the device name.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}


def datasheet_peak_flops(device_name: str) -> float | None:
    """The datasheet dense bf16 FLOP/s of ``device_name``, or ``None`` if it is not listed."""
    for part, tflops in DATASHEET_BF16_TFLOPS.items():
        if part in device_name:
            return tflops * 1e12
    return None


def long_rows(tokenizer: Any, count: int, length: int) -> list[dict[str, str]]:
    """``count`` rows of at least ``length`` tokens (long reports built from the data's replies)."""
    from launcher.data.encode import encode_row

    replies = [
        json.loads(line)["response"] for line in (REPO / "configs/data/realistic_lengths.jsonl").open()
    ]
    rows: list[dict[str, str]] = []
    start = 0
    while len(rows) < count:
        parts: list[str] = []
        row = {"prompt": "Write a long report about the community projects.", "response": ""}
        while len(encode_row(row, tokenizer, length)["input_ids"]) < length:
            parts.append(replies[start % len(replies)])
            start += 1
            row["response"] = "\n\n".join(parts)
        rows.append(row)
    return rows


def matmul_peak_flops(device: str, repeats: int = 20) -> float:
    """FLOP/s of a large square bf16 matmul on ``device`` (the best of ``repeats``)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def build_model(folder: Path, size: str) -> int:
    """Save a random Llama of ``size`` with SmolLM2's tokenizer into ``folder``; its parameter count."""
    return build_random_llama(folder, SIZES[size], max_positions=4096, seed=SEED)


def tokens_per_second(records: list[dict[str, Any]], tokens_per_step: int) -> float:
    """From the median time between logged optimizer steps (the first, warm-up step excluded)."""
    times = [r["time"] for r in sorted((r for r in records if "loss" in r), key=lambda r: r["step"])]
    return tokens_per_step / statistics.median(b - a for a, b in pairwise(times[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tokens/s and MFU of full fine-tuning and LoRA on one GPU")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 TFLOP/s (if not listed)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or --device cpu for a smoke run")

    workspace = make_workspace(args.workdir, threads=torch.get_num_threads())
    model_dir = workspace.root / f"llama-{args.size}"
    parameters = build_model(model_dir, args.size)
    tokenizer = load_tokenizer(ModelSpec(path="smollm2-135m-instruct"))
    rows = long_rows(tokenizer, args.micro_batch * (args.steps + 1), args.seq)
    data = workspace.root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    measured = matmul_peak_flops(args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    listed = args.peak_tflops * 1e12 if args.peak_tflops else datasheet_peak_flops(device)
    if listed is None and args.device == "cuda":
        raise SystemExit(f"no datasheet bf16 peak for {device}: pass --peak-tflops")
    peak = listed or measured  # a CPU smoke run has no datasheet: its measured peak stands in
    tokens_per_step = args.micro_batch * args.seq
    results: dict[str, Any] = {
        "device": device,
        "parameters": parameters,
        "seq": args.seq,
        "micro_batch": args.micro_batch,
        "peak_bf16_tflops": peak / 1e12,
        "peak_source": "datasheet" if listed else "measured",
        "measured_bf16_matmul_tflops": measured / 1e12,
    }
    print(
        f"{parameters / 1e9:.2f}B parameters; bf16 peak {peak / 1e12:.1f} TFLOP/s ({results['peak_source']}), "
        f"measured matmul {measured / 1e12:.1f} TFLOP/s"
    )
    for method, flops_per_token in (("full", 6), ("lora", 4)):
        spec = flotilla_spec(data, args.seq, args.micro_batch, args.steps)
        spec["model"]["path"] = str(model_dir)
        spec["resources"] = {"backend": "local", "device": args.device, "precision": "bf16"}
        if method == "full":
            spec["peft"] = {"method": "none"}
            spec["train"]["learning_rate"] = 1e-5
        run = run_flotilla(f"mfu-{method}", spec, workspace)
        rate = tokens_per_second(run.records, tokens_per_step)
        mfu = flops_per_token * parameters * rate / peak
        results[method] = {
            "tokens_per_second": rate,
            "mfu": mfu,
            "share_of_measured_matmul": flops_per_token * parameters * rate / measured,
            "peak_rss_gib": run.peak_rss_gib,
        }
        print(f"{method:>5}: {rate:,.0f} tokens/s, MFU {mfu:.1%} ({flops_per_token}·N FLOPs per token)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
