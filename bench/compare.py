"""Training speed of Flotilla against the strongest peers a user would pick instead, in one run.

Sides (each run a fresh process; the order alternates every repeat):

- ``hf_padding`` (a): transformers Trainer + peft, default padding (bench/baseline_hf.py);
- ``hf_flatten`` (b): the same with ``DataCollatorWithFlattening``, the best plain-HF setup;
- ``trl_padding_free`` (c): TRL ``SFTTrainer`` with ``padding_free=True`` (bench/baseline_trl.py);
- ``flotilla_defaults`` (d): ``flotilla run`` with the spec's defaults;
- ``flotilla_fast`` (e): Flotilla with its speed options on (``data.packing``, which picks
  per-document attention, and ``train.target_only_logits``).

Every side trains the same rows in the same order (one shuffled order, written once: Flotilla reads it
with ``data.shuffle: false``, the peers get the same rows pre-tokenized by Flotilla's encoder and a
sequential sampler), so every step sees the same batch; the first logged loss of every side must agree,
which the script checks (LoRA's B starts at zero, so step 1's loss is the base model's on that batch).
Same model (SmolLM2-135M-Instruct), LoRA, float32, threads. Useful tokens/s is the batch's real tokens
over the timed steps (after warm-up), and efficiency is the model FLOPs of those steps
(bench/train_flops.py) per second over the measured matmul peak of the same threads.

Measures: tokens/s at each batch size; step time with Flotilla's extras off against (b) on fixed-length
rows; a full fine-tune; peak memory with gradient checkpointing on for both sides. Raw results go to
``--json`` (bench/results/compare.json); bench/results_tables.py writes the RESULTS.md tables from it.

    python bench/compare.py --json bench/results/compare.json     # the full comparison
    python bench/compare.py --quick                                # a smoke run (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from train_flops import ModelShape, matmul_peak_flops, step_flops

from launcher.plan.deepspeed import merge
from launcher.rundir import read_jsonl

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
LENGTHS_DATA = REPO / "configs" / "data" / "realistic_lengths.jsonl"
MODEL_ALIAS = "smollm2-135m-instruct"
LEARNING_RATE = 2e-4
SEED = 42
RUN_TIMEOUT_S = 3600
#: The first logged losses of the sides must agree this closely (relative): same batch, same loss.
LOSS_TOLERANCE = 2e-3
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is."""

    repeats: int
    batches: tuple[int, ...]
    #: max_length per batch size: rows longer are left out (the padded peer at batch 16 and 512 tokens
    #: needs over 20 GB of float32 activations, more than a 23 GB machine has).
    max_lengths: tuple[int, ...]
    warmup_steps: int
    timed_steps: tuple[int, ...]
    fixed_batch: int
    fixed_length: int
    fixed_steps: int
    full_batch: int
    full_steps: int
    memory_batch: int
    memory_steps: int


FULL = Sizes(
    repeats=1,
    batches=(16, 4),
    max_lengths=(256, 512),
    warmup_steps=2,
    timed_steps=(20, 20),
    fixed_batch=4,
    fixed_length=128,
    fixed_steps=20,
    full_batch=4,
    full_steps=20,
    memory_batch=4,
    memory_steps=21,  # 1 warm-up + 20 timed
)
QUICK = Sizes(
    repeats=1,
    batches=(4,),
    max_lengths=(256,),
    warmup_steps=1,
    timed_steps=(3,),
    fixed_batch=2,
    fixed_length=64,
    fixed_steps=3,
    full_batch=2,
    full_steps=2,
    memory_batch=2,
    memory_steps=2,
)


@dataclass(frozen=True)
class Side:
    """One way to train: a peer script with its options, or Flotilla with spec overrides."""

    name: str
    label: str
    kind: str  # "hf", "trl" or "flotilla"
    options: dict[str, Any] = field(default_factory=dict)


HF_PADDING = Side("hf_padding", "(a) HF Trainer + peft, default padding", "hf", {"collator": "padding"})
HF_FLATTEN = Side(
    "hf_flatten", "(b) HF Trainer + peft, DataCollatorWithFlattening", "hf", {"collator": "flatten"}
)
TRL_PADDING_FREE = Side("trl_padding_free", "(c) TRL SFTTrainer, padding_free", "trl")
FLOTILLA_DEFAULTS = Side("flotilla_defaults", "(d) Flotilla, defaults", "flotilla")
FLOTILLA_FAST = Side(
    "flotilla_fast",
    "(e) Flotilla, packing + per-document attention + target-only logits",
    "flotilla",
    {
        "data": {"packing": True},
        "model": {"attention": "per_document"},
        "train": {"target_only_logits": True},
    },
)
FLOTILLA_EXTRAS_OFF = Side(
    "flotilla_extras_off",
    "Flotilla, every extra off (padding, full-head logits)",
    "flotilla",
    {"train": {"target_only_logits": False}},
)
THROUGHPUT_SIDES = (HF_PADDING, HF_FLATTEN, TRL_PADDING_FREE, FLOTILLA_DEFAULTS, FLOTILLA_FAST)


@dataclass
class Run:
    """One finished process: its peak RSS and the step records it logged."""

    peak_rss_gib: float
    records: list[dict[str, Any]] = field(default_factory=list)

    def step_times(self) -> dict[int, float]:
        """Wall-clock time at the end of each optimizer step (one log record per step)."""
        return {r["step"]: r["time"] for r in self.records if "loss" in r}

    def first_loss(self) -> float:
        return next(r["loss"] for r in sorted(self.records, key=lambda r: r["step"]) if "loss" in r)


@dataclass
class Workspace:
    """Where the runs write, and what every run needs."""

    root: Path
    model_dir: Path
    env: dict[str, str]
    flotilla: list[str]
    counter: int = 0

    def next_name(self, label: str) -> str:
        self.counter += 1
        return f"{self.counter:03d}-{label}"


# ----------------------------------------------------------------------------- processes


def run_process(name: str, command: list[str], workspace: Workspace) -> Run:
    """Run ``command`` to the end in a fresh process; its peak RSS comes from ``wait4``."""
    log = workspace.root / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    with log.open("w") as handle:
        proc = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=workspace.root, env=workspace.env
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > RUN_TIMEOUT_S:
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name} failed with exit code {exit_code} ({log}):\n{tail}")
    return Run(usage.ru_maxrss / 2**20)  # ru_maxrss: KiB on Linux


def flotilla_spec(
    data: Path, max_length: int, batch: int, steps: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A Flotilla job over ``data`` in file order: no evaluation, one log record per step."""
    spec = {
        "seed": SEED,
        "model": {"path": MODEL_ALIAS},
        "data": {
            "train": str(data),
            "format": "instruction",
            "max_length": max_length,
            "validation_ratio": 0.0,
            "shuffle": False,
        },
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {
            "learning_rate": LEARNING_RATE,
            "micro_batch_size": batch,
            "max_steps": steps,
            "logging_steps": 1,
        },
        "eval": {"at_start": False},
        "resources": {"backend": "local", "device": "cpu"},
    }
    return merge(spec, overrides or {})


def run_flotilla(label: str, spec: dict[str, Any], workspace: Workspace) -> Run:
    """``flotilla run`` of ``spec`` in a fresh process; records from the run's metrics.jsonl."""
    name = workspace.next_name(label)
    spec = {**spec, "name": name, "output": {"dir": str(workspace.root / "runs")}}
    spec_path = workspace.root / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run = run_process(name, [*workspace.flotilla, "run", "--quiet", str(spec_path)], workspace)
    (metrics,) = (workspace.root / "runs" / name).glob("*/metrics.jsonl")
    run.records = read_jsonl(metrics)
    return run


def run_side(side: Side, data: RowSet, batch: int, steps: int, workspace: Workspace, **extra: Any) -> Run:
    """Train ``steps`` steps of ``batch`` rows of ``data`` on ``side`` in a fresh process."""
    if side.kind == "flotilla":
        overrides = merge(side.options, extra.get("flotilla", {}))
        spec = flotilla_spec(data.text_file, data.max_length, batch, steps, overrides)
        run = run_flotilla(f"{side.name}-b{batch}", spec, workspace)
    else:
        name = workspace.next_name(f"{side.name}-b{batch}")
        script = BENCH / ("baseline_hf.py" if side.kind == "hf" else "baseline_trl.py")
        records = workspace.root / f"{name}.jsonl"
        options = {**side.options, **extra.get("peer", {})}
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items() if value is not True]
        flags += [f"--{key.replace('_', '-')}" for key, value in options.items() if value is True]
        command = [
            sys.executable,
            str(script),
            f"--model={workspace.model_dir}",
            f"--tokens={data.token_file}",
        ]
        command += [f"--batch-size={batch}", f"--max-steps={steps}", f"--learning-rate={LEARNING_RATE}"]
        command += [
            f"--seed={SEED}",
            f"--output-dir={workspace.root / name}",
            f"--log-jsonl={records}",
            *flags,
        ]
        run = run_process(name, command, workspace)
        run.records = read_jsonl(records)
    return run


def alternate(repeat: int, sides: list[Side], run: Any) -> dict[str, Run]:
    """Run every side once, in an order that flips each repeat."""
    order = sides[::-1] if repeat % 2 else sides
    return {side.name: run(side) for side in order}


# ----------------------------------------------------------------------------- data


@dataclass
class RowSet:
    """The rows every side trains, in training order: as text (Flotilla) and as tokens (the peers)."""

    text_file: Path
    token_file: Path
    max_length: int
    lengths: list[int]
    #: per row, the positions whose next token is a target (where the loss needs logits)
    targets: list[int]


def encoded_rows(tokenizer: Any, max_length: int) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """The realistic-lengths rows that fit ``max_length`` with a target, each once, with Flotilla's
    encoding (so Flotilla's data step keeps every one of them, and the peers get its exact tokens)."""
    from launcher.data.encode import encode_row

    seen: set[str] = set()
    rows = []
    for line in LENGTHS_DATA.read_text().splitlines():
        row = json.loads(line)
        item = encode_row(row, tokenizer, max_length)
        key = json.dumps(row, sort_keys=True)
        if item["full_length"] > max_length or all(x == -100 for x in item["labels"]) or key in seen:
            continue
        seen.add(key)
        rows.append((row, item))
    return rows


def write_rows(
    workspace: Workspace, name: str, rows: list[tuple[dict[str, str], dict[str, Any]]], max_length: int
) -> RowSet:
    """Write ``rows`` in this order as text and as tokens."""
    text = workspace.root / f"{name}.jsonl"
    tokens = workspace.root / f"{name}.tokens.jsonl"
    text.write_text("".join(json.dumps(row) + "\n" for row, _ in rows))
    tokens.write_text(
        "".join(
            json.dumps({"input_ids": item["input_ids"], "labels": item["labels"]}) + "\n" for _, item in rows
        )
    )
    lengths = [len(item["input_ids"]) for _, item in rows]
    targets = [sum(label != -100 for label in item["labels"][1:]) for _, item in rows]
    return RowSet(text, tokens, max_length, lengths, targets)


def shuffled_rows(tokenizer: Any, workspace: Workspace, max_length: int, count: int, seed: int) -> RowSet:
    """``count`` realistic rows in one seeded random order (the order every side trains)."""
    rows = encoded_rows(tokenizer, max_length)
    if len(rows) < count:
        raise SystemExit(
            f"{LENGTHS_DATA} has {len(rows)} rows of at most {max_length} tokens; {count} needed"
        )
    random.Random(seed).shuffle(rows)
    return write_rows(workspace, f"rows-{max_length}-{count}-{seed}", rows[:count], max_length)


def fixed_length_rows(tokenizer: Any, workspace: Workspace, length: int, count: int) -> RowSet:
    """``count`` rows truncated to exactly ``length`` tokens (every batch has one shape, no padding)."""
    from launcher.data.encode import encode_row

    rows = []
    for line in LENGTHS_DATA.read_text().splitlines():
        row = json.loads(line)
        item = encode_row(row, tokenizer, length)
        if len(item["input_ids"]) == length and any(x != -100 for x in item["labels"]):
            rows.append((row, item))
        if len(rows) == count:
            return write_rows(workspace, f"fixed-{length}", rows, length)
    raise SystemExit(f"{LENGTHS_DATA} has fewer than {count} rows of {length}+ tokens")


# ----------------------------------------------------------------------------- measurements


def timed_rate(run: Run, data: RowSet, batch: int, warmup: int, timed: int) -> dict[str, float]:
    """Useful tokens/s and seconds per step over steps ``warmup+1 .. warmup+timed``."""
    times = run.step_times()
    seconds = times[warmup + timed] - times[warmup]
    tokens = sum(data.lengths[warmup * batch : (warmup + timed) * batch])
    return {"tokens_per_second": tokens / seconds, "seconds_per_step": seconds / timed, "tokens": tokens}


def timed_flops(shape: ModelShape, data: RowSet, batch: int, warmup: int, timed: int, full: bool) -> float:
    """Model FLOPs of steps ``warmup+1 .. warmup+timed`` (bench/train_flops.py)."""
    starts = range(warmup * batch, (warmup + timed) * batch, batch)
    return sum(
        step_flops(shape, data.lengths[i : i + batch], data.targets[i : i + batch], full) for i in starts
    )


def same_first_loss(runs: dict[str, Run]) -> dict[str, Any]:
    """The sides' first logged losses, and whether they agree (the same batch, the same loss)."""
    losses = {name: run.first_loss() for name, run in runs.items()}
    reference = statistics.median(losses.values())
    spread = max(abs(v - reference) for v in losses.values()) / reference
    return {"first_losses": losses, "relative_spread": spread, "agree": spread <= LOSS_TOLERANCE}


def measure_sides(
    sides: list[Side],
    data: RowSet,
    batch: int,
    warmup: int,
    timed: int,
    sizes: Sizes,
    context: Context,
    full: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Tokens/s, step time, efficiency and peak memory of every side, ``sizes.repeats`` times."""
    per_side: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
    checks = []
    flops = timed_flops(context.shape, data, batch, warmup, timed, full)  # the same rows on every side
    for repeat in range(sizes.repeats):
        runs = alternate(
            repeat,
            sides,
            lambda side: run_side(side, data, batch, warmup + timed, context.workspace, **extra),
        )
        checks.append(same_first_loss(runs))
        for name, run in runs.items():
            rate = timed_rate(run, data, batch, warmup, timed)
            rate["efficiency"] = flops / (rate["seconds_per_step"] * timed) / context.peak["flops_per_second"]
            rate["peak_rss_gib"] = run.peak_rss_gib
            per_side[name].append(rate)
        print(
            f"  batch {batch} repeat {repeat + 1}: "
            + ", ".join(f"{n} {v[-1]['tokens_per_second']:.1f} tok/s" for n, v in per_side.items())
            + f"; first losses agree: {checks[-1]['agree']} (spread {checks[-1]['relative_spread']:.1e})",
            flush=True,
        )
    return {
        "batch": batch,
        "max_length": data.max_length,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "rows": len(data.lengths),
        "useful_tokens_per_step": statistics.mean(data.lengths) * batch,
        "full_fine_tune": full,
        "sides": {side.name: {"label": side.label, "repeats": per_side[side.name]} for side in sides},
        "first_loss_checks": checks,
    }


@dataclass
class Context:
    """What every measurement shares."""

    workspace: Workspace
    tokenizer: Any
    shape: ModelShape
    peak: dict[str, Any]
    throughput_sides: list[Side]


def measure_throughput(sizes: Sizes, context: Context) -> list[dict[str, Any]]:
    """(1) useful tokens/s of every side at each batch size, on the realistic rows in one shared order."""
    results = []
    for batch, max_length, timed in zip(sizes.batches, sizes.max_lengths, sizes.timed_steps, strict=True):
        count = batch * (sizes.warmup_steps + timed)
        data = shuffled_rows(context.tokenizer, context.workspace, max_length, count, SEED)
        results.append(
            measure_sides(context.throughput_sides, data, batch, sizes.warmup_steps, timed, sizes, context)
        )
    return results


def measure_fixed(sizes: Sizes, context: Context) -> dict[str, Any]:
    """(2) step time with Flotilla's extras off against (b) on fixed-length rows (nothing to pad)."""
    batch, steps = sizes.fixed_batch, sizes.fixed_steps
    data = fixed_length_rows(
        context.tokenizer, context.workspace, sizes.fixed_length, batch * (sizes.warmup_steps + steps)
    )
    return measure_sides(
        [HF_FLATTEN, FLOTILLA_EXTRAS_OFF], data, batch, sizes.warmup_steps, steps, sizes, context
    )


def measure_full(sizes: Sizes, context: Context) -> dict[str, Any]:
    """(3) a full fine-tune: (b) against Flotilla's fast setup, realistic rows."""
    batch, steps = sizes.full_batch, sizes.full_steps
    max_length = sizes.max_lengths[-1]
    data = shuffled_rows(
        context.tokenizer, context.workspace, max_length, batch * (sizes.warmup_steps + steps), SEED + 1
    )
    extra = {"flotilla": {"peft": {"method": "none"}}, "peer": {"full": True}}
    return measure_sides(
        [HF_FLATTEN, FLOTILLA_FAST],
        data,
        batch,
        sizes.warmup_steps,
        steps,
        sizes,
        context,
        full=True,
        **extra,
    )


def measure_memory(sizes: Sizes, context: Context) -> dict[str, Any]:
    """(4) peak memory with gradient checkpointing on for both sides, (b) against Flotilla's fast setup."""
    batch, steps = sizes.memory_batch, sizes.memory_steps
    max_length = sizes.max_lengths[-1]
    data = shuffled_rows(context.tokenizer, context.workspace, max_length, batch * steps, SEED + 2)
    extra = {
        "flotilla": {"model": {"gradient_checkpointing": True}},
        "peer": {"gradient_checkpointing": True},
    }
    return measure_sides([HF_FLATTEN, FLOTILLA_FAST], data, batch, 1, steps - 1, sizes, context, **extra)


# ----------------------------------------------------------------------------- report


def machine(threads: int) -> dict[str, Any]:
    """What ran the benchmark."""
    import torch
    import transformers
    import trl

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "threads_per_process": threads,
    }


def make_workspace(keep: Path | None, threads: int) -> Workspace:
    """A scratch folder, the model folder every side loads, and the environment of every run."""
    from launcher.model.load import loadable_source
    from launcher.spec.models import ModelSpec

    root = keep or Path(tempfile.mkdtemp(prefix="flotilla-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    model_dir = Path(loadable_source(ModelSpec(path=MODEL_ALIAS)).name_or_path)
    script = Path(sys.executable).parent / "flotilla"
    flotilla = [str(script)] if script.is_file() else [sys.executable, "-m", "launcher.cli"]
    env = {**os.environ, **CHILD_ENV, "HF_DATASETS_CACHE": str(root / "hf-datasets-cache")}
    env["FLOTILLA_CACHE"] = str(root / "flotilla-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    return Workspace(root, model_dir, env, flotilla)


def main(argv: list[str] | None = None) -> int:
    """Run the measurements, print a summary, write the raw results with --json."""
    parser = argparse.ArgumentParser(description="Flotilla's training speed against its strongest peers")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny sizes)")
    parser.add_argument("--repeats", type=int, help="override the number of repeats")
    parser.add_argument("--timed-steps", type=int, nargs="+", help="timed steps per batch size")
    parser.add_argument("--only", nargs="+", choices=["throughput", "fixed", "full", "memory"])
    parser.add_argument("--batches", type=int, nargs="+", help="only these of the throughput batch sizes")
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=[side.name for side in THROUGHPUT_SIDES],
        help="only these throughput sides",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per training process, the same for every side"
    )
    parser.add_argument("--json", type=Path, help="write every raw number to this file")
    parser.add_argument("--workdir", type=Path, help="keep runs and logs here (default: a temp folder)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(**{**asdict(sizes), "repeats": args.repeats})
    if args.batches:
        keep = [i for i, batch in enumerate(sizes.batches) if batch in args.batches]
        picked = {
            name: tuple(getattr(sizes, name)[i] for i in keep)
            for name in ("batches", "max_lengths", "timed_steps")
        }
        sizes = Sizes(**{**asdict(sizes), **picked})
    if args.timed_steps:
        sizes = Sizes(**{**asdict(sizes), "timed_steps": tuple(args.timed_steps)})
    sides = [side for side in THROUGHPUT_SIDES if not args.sides or side.name in args.sides]
    wanted = args.only or ["throughput", "fixed", "full", "memory"]

    from launcher.model.load import load_tokenizer
    from launcher.spec.models import ModelSpec

    started = time.time()
    load_before = os.getloadavg()
    workspace = make_workspace(args.workdir, args.threads)
    context = Context(
        workspace,
        load_tokenizer(ModelSpec(path=MODEL_ALIAS)),
        ModelShape.of(str(workspace.model_dir)),
        matmul_peak_flops(args.threads),
        sides,
    )
    print(f"work folder {workspace.root}; matmul peak {context.peak['flops_per_second'] / 1e9:.1f} GFLOP/s")
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/compare.py", *(argv if argv is not None else sys.argv[1:])]),
        "sizes": asdict(sizes),
        "model_shape": asdict(context.shape),
        "matmul_peak": context.peak,
    }
    measures = {
        "throughput": measure_throughput,
        "fixed": measure_fixed,
        "full": measure_full,
        "memory": measure_memory,
    }
    for name in wanted:
        print(f"{name}:", flush=True)
        results[name] = measures[name](sizes, context)
    results.update(
        machine=machine(args.threads),
        load_average_start=load_before,
        load_average_end=os.getloadavg(),
        wall_seconds=time.time() - started,
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workspace.root, ignore_errors=True)
    print(f"wall time {results['wall_seconds']:.0f} s")
    checks = [
        c
        for m in (results.get(n) for n in wanted)
        for r in (m if isinstance(m, list) else [m])
        for c in r["first_loss_checks"]
    ]
    return 0 if all(c["agree"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
