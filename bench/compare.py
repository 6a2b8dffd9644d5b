"""Flotilla against the plain Hugging Face baseline (bench/baseline_hf.py), measured side by side.

Every measurement starts a fresh process (``flotilla run`` or ``python bench/baseline_hf.py``); the
two sides alternate within each repeat (the order flips every repeat), and ratios are taken per repeat
and shown as min / median / max. Both sides train the real SmolLM2-135M-Instruct with the same LoRA
settings, rows, tokens, sequence length, batch and seed.

1. useful (non-pad) tokens/s on configs/data/realistic_lengths.jsonl, over the second of two epochs
   (the first warms up): Flotilla with ``data.packing`` (and ``data.group_by_length``) vs padding;
2. step time with Flotilla's extras off (no evaluation, no saves, no packing) on fixed-length rows;
3. command start to the first logged optimizer step (the same runs as 2);
4. peak RSS at sequence 1024 with and without gradient checkpointing.

Before any of that, it checks that packing is correct: the loss of a packed batch equals the loss of
the same rows padded.

    python bench/compare.py            # the full comparison (under 15 minutes on 2 CPU cores)
    python bench/compare.py --quick    # a smoke run (about 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from launcher.rundir import read_jsonl

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "bench" / "baseline_hf.py"
LENGTHS_DATA = REPO / "configs" / "data" / "realistic_lengths.jsonl"
MODEL_ALIAS = "smollm2-135m-instruct"
LEARNING_RATE = 2e-4
SEED = 42
RUN_TIMEOUT_S = 900
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is (kept small: the machine has 2 shared CPU cores)."""

    repeats: int
    throughput_rows: int
    throughput_batch: int
    throughput_max_length: int
    step_batch: int
    step_length: int
    step_steps: int
    memory_length: int
    memory_steps: int
    memory_repeats: int
    memory_baseline: bool


FULL = Sizes(
    repeats=3,
    throughput_rows=8,
    throughput_batch=4,
    throughput_max_length=512,
    step_batch=2,
    step_length=128,
    step_steps=6,
    memory_length=1024,
    memory_steps=2,
    memory_repeats=1,
    memory_baseline=True,
)
QUICK = Sizes(
    repeats=1,
    throughput_rows=4,
    throughput_batch=2,
    throughput_max_length=512,
    step_batch=1,
    step_length=64,
    step_steps=3,
    memory_length=256,
    memory_steps=1,
    memory_repeats=1,
    memory_baseline=False,
)


@dataclass
class Run:
    """One finished process: when it started, its peak RSS, and the step records it logged."""

    label: str
    command: list[str]
    started: float
    seconds: float
    exit_code: int
    peak_rss_gib: float
    records: list[dict[str, Any]] = field(default_factory=list)

    def steps(self) -> list[dict[str, Any]]:
        """Per-step log records (loss logged every step), in step order."""
        return sorted((r for r in self.records if "loss" in r), key=lambda r: r["step"])

    def final(self) -> dict[str, Any]:
        """The end-of-training record (total_flos, train_runtime)."""
        return next(r for r in self.records if "total_flos" in r)


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
        return f"{label}-{self.counter}"


# ----------------------------------------------------------------------------- processes


def run_process(label: str, command: list[str], workspace: Workspace) -> tuple[Run, Path]:
    """Run ``command`` to the end in a fresh process; its peak RSS comes from ``wait4``."""
    log = workspace.root / "logs" / f"{label}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.time()
    with log.open("w") as handle:
        proc = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=workspace.root, env=workspace.env
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - started > RUN_TIMEOUT_S:
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    run = Run(
        label,
        command,
        started,
        time.time() - started,
        proc.returncode,
        usage.ru_maxrss / 2**20,  # KiB on Linux
    )
    if run.exit_code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{label} failed with exit code {run.exit_code} ({log}):\n{tail}")
    return run, log


def run_flotilla(label: str, spec: dict[str, Any], workspace: Workspace) -> Run:
    """``flotilla run spec.yaml`` in a fresh process; records from the run's metrics.jsonl."""
    name = workspace.next_name(label)
    spec = {**spec, "name": name, "output": {"dir": str(workspace.root / "runs")}}
    spec_path = workspace.root / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run, _ = run_process(name, [*workspace.flotilla, "run", str(spec_path)], workspace)
    (metrics,) = (workspace.root / "runs" / name).glob("*/metrics.jsonl")
    run.records = read_jsonl(metrics)
    return run


def run_baseline(label: str, options: dict[str, Any], workspace: Workspace) -> Run:
    """``python bench/baseline_hf.py ...`` in a fresh process; records from its --log-jsonl."""
    name = workspace.next_name(label)
    records = workspace.root / f"{name}.jsonl"
    args = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    command = [sys.executable, str(BASELINE), f"--model={workspace.model_dir}", *args]
    command += [f"--output-dir={workspace.root / name}", f"--log-jsonl={records}"]
    run, _ = run_process(name, command, workspace)
    run.records = read_jsonl(records)
    return run


def flotilla_spec(
    data: Path,
    max_length: int,
    batch: int,
    seed: int,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    packing: bool = False,
    group_by_length: bool = False,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """A Flotilla job with its extras off: no evaluation, no checkpoints, one log per step."""
    return {
        "seed": seed,
        "model": {"path": MODEL_ALIAS, "gradient_checkpointing": gradient_checkpointing},
        "data": {
            "train": str(data),
            "format": "instruction",
            "max_length": max_length,
            "validation_ratio": 0.0,
            "packing": packing,
            "group_by_length": group_by_length,
        },
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {
            "learning_rate": LEARNING_RATE,
            "micro_batch_size": batch,
            "epochs": epochs,
            "max_steps": max_steps,
            "logging_steps": 1,
        },
        "eval": {"at_start": False},
        "resources": {"backend": "local", "device": "cpu"},
    }


def alternate(repeat: int, sides: list[Callable[[], Run]]) -> list[Run]:
    """Run every side once, in an order that flips each repeat; results in the given order."""
    order = list(range(len(sides)))
    if repeat % 2:
        order.reverse()
    results: dict[int, Run] = {}
    for index in order:
        results[index] = sides[index]()
    return [results[i] for i in range(len(sides))]


# ----------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def encode(tokenizer: Any, row: dict[str, str], max_length: int) -> dict[str, Any]:
    """Flotilla's encoding of an instruction row (the train core uses the same function)."""
    from launcher.data.encode import encode_row

    return encode_row(row, tokenizer, max_length)


def baseline_ids(tokenizer: Any, row: dict[str, str], max_length: int) -> list[int]:
    """The baseline's encoding (bench/baseline_hf.py): the chat template, truncated."""
    messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, truncation=True, max_length=max_length)
    return list(encoded["input_ids"])


def has_target(item: dict[str, Any]) -> bool:
    return any(label != -100 for label in item["labels"])


def throughput_rows(tokenizer: Any, count: int, max_length: int) -> tuple[list[dict[str, str]], int]:
    """The first ``count`` rows of the realistic-lengths file that fit ``max_length``, and their tokens.

    Both sides must see the same token sequences, so this checks that they encode each row the same.
    """
    rows, tokens = [], 0
    for line in LENGTHS_DATA.read_text().splitlines():
        row = json.loads(line)
        item = encode(tokenizer, row, max_length)
        if item["full_length"] > max_length or not has_target(item):
            continue
        if item["input_ids"] != baseline_ids(tokenizer, row, max_length):
            raise SystemExit(f"Flotilla and the baseline tokenize this row differently: {row['prompt'][:60]}")
        rows.append(row)
        tokens += len(item["input_ids"])
        if len(rows) == count:
            return rows, tokens
    raise SystemExit(f"{LENGTHS_DATA} has fewer than {count} rows of at most {max_length} tokens")


def fixed_length_rows(tokenizer: Any, count: int, length: int) -> list[dict[str, str]]:
    """Rows that both sides truncate to exactly ``length`` tokens (so every batch has one shape)."""
    rows = []
    for line in LENGTHS_DATA.read_text().splitlines():
        row = json.loads(line)
        item = encode(tokenizer, row, length)
        if len(item["input_ids"]) == length and has_target(item):
            rows.append(row)
        if len(rows) == count:
            return rows
    raise SystemExit(f"{LENGTHS_DATA} has fewer than {count} rows of {length}+ tokens")


def long_rows(tokenizer: Any, count: int, length: int) -> list[dict[str, str]]:
    """Rows longer than ``length`` tokens with a short prompt: long reports built from the data's replies."""
    replies = [json.loads(line)["response"] for line in LENGTHS_DATA.read_text().splitlines()]
    rows: list[dict[str, str]] = []
    start = 0
    while len(rows) < count:
        parts: list[str] = []
        row = {"prompt": "Write a long report about the community projects.", "response": ""}
        while len(encode(tokenizer, row, length)["input_ids"]) < length:
            parts.append(replies[start % len(replies)])
            start += 1
            row["response"] = "\n\n".join(parts)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- statistics


@dataclass
class Comparison:
    """One headline number: a ratio per repeat, its goal, and the raw values behind it."""

    name: str
    unit: str
    flotilla: list[float]
    baseline: list[float]
    goal: str
    passes: Callable[[float], bool]
    note: str = ""

    @property
    def ratios(self) -> list[float]:
        return [f / b for f, b in zip(self.flotilla, self.baseline, strict=True)]

    def as_dict(self) -> dict[str, Any]:
        ratios = self.ratios
        return {
            "name": self.name,
            "unit": self.unit,
            "flotilla": self.flotilla,
            "baseline": self.baseline,
            "ratios": ratios,
            "ratio_min_median_max": [min(ratios), statistics.median(ratios), max(ratios)],
            "goal": self.goal,
            "met": self.passes(statistics.median(ratios)),
            "note": self.note,
        }


def median(values: list[float]) -> float:
    return statistics.median(values)


def step_seconds(run: Run) -> float:
    """Median time between consecutive optimizer steps, the first step excluded."""
    times = [r["time"] for r in run.steps()]
    return median([b - a for a, b in pairwise(times)])


def second_epoch_tokens_per_second(run: Run, steps_per_epoch: int, tokens_per_epoch: int) -> float:
    """Useful tokens per second over the second epoch (from the end of step E to the end of step 2E)."""
    times = {r["step"]: r["time"] for r in run.steps()}
    return tokens_per_epoch / (times[2 * steps_per_epoch] - times[steps_per_epoch])


def start_to_first_step(run: Run) -> float:
    """Seconds from the command's start to the first logged optimizer step."""
    return run.steps()[0]["time"] - run.started


# ----------------------------------------------------------------------------- measurements


def packing_check(tokenizer: Any) -> dict[str, Any]:
    """The loss of a packed (flattened) batch must equal the loss of the same rows padded.

    The model comes from the train core's ``build_model`` for a job with ``data.packing: true``.
    As a control, the packed batch run with a KV cache (transformers' default, ``use_cache=True``)
    must give a different loss: with a cache transformers skips the block-diagonal mask and rows
    attend to each other, which is what the check has to be able to tell apart.
    """
    import torch

    from launcher.spec.models import JobSpec
    from launcher.train.core import build_model
    from launcher.train.trainer import BatchCollator

    spec = JobSpec.model_validate(
        {
            "name": "packing-check",
            "model": {"path": MODEL_ALIAS},
            "data": {"train": str(LENGTHS_DATA), "packing": True},
        }
    )
    rows = [json.loads(line) for line in LENGTHS_DATA.read_text().splitlines()[:4]]
    features = [encode(tokenizer, row, 512) for row in rows]
    model, _ = build_model(spec, None, tokenizer)
    model.eval()  # no dropout, so both forms see the same function
    padded = BatchCollator(tokenizer, "causal_lm", packing=False)(features)
    packed = BatchCollator(tokenizer, "causal_lm", packing=True)(features)
    with torch.no_grad():
        losses = {
            "padded": float(model(**padded).loss),
            "packed": float(model(**packed).loss),
            "packed_with_kv_cache": float(model(**packed, use_cache=True).loss),
        }
    del model
    difference = abs(losses["packed"] - losses["padded"])
    control = abs(losses["packed_with_kv_cache"] - losses["padded"])
    return {
        "rows": len(rows),
        "lengths": [len(f["input_ids"]) for f in features],
        "padded_shape": list(padded["input_ids"].shape),
        "packed_shape": list(packed["input_ids"].shape),
        "losses": losses,
        "abs_difference": difference,
        "control_abs_difference": control,
        "equal": difference < 1e-4 * losses["padded"] and control > 100 * max(difference, 1e-7),
    }


def measure_throughput(
    sizes: Sizes, workspace: Workspace, tokenizer: Any, group_by_length: bool
) -> list[Comparison]:
    """(1) useful tokens/s over the second epoch: Flotilla packing (and length grouping) vs padding."""
    rows, tokens = throughput_rows(tokenizer, sizes.throughput_rows, sizes.throughput_max_length)
    data = write_jsonl(workspace.root / "throughput.jsonl", rows)
    steps_per_epoch = math.ceil(len(rows) / sizes.throughput_batch)
    length, batch = sizes.throughput_max_length, sizes.throughput_batch
    variants = {"packing": {"packing": True}}
    if group_by_length:
        variants["group_by_length"] = {"group_by_length": True}
    values: dict[str, list[float]] = {name: [] for name in [*variants, "baseline"]}
    work: dict[str, list[float]] = {name: [] for name in values}
    for repeat in range(sizes.repeats):
        seed = SEED + repeat  # a new batch composition each repeat, the same on both sides
        sides = [
            partial(
                run_flotilla,
                "tput-flotilla",
                flotilla_spec(data, length, batch, seed, epochs=2, **options),
                workspace,
            )
            for options in variants.values()
        ]
        options = {"data": data, "max_length": length, "batch_size": batch, "epochs": 2, "seed": seed}
        sides.append(
            partial(run_baseline, "tput-baseline", {**options, "learning_rate": LEARNING_RATE}, workspace)
        )
        for name, run in zip(values, alternate(repeat, sides), strict=True):
            values[name].append(second_epoch_tokens_per_second(run, steps_per_epoch, tokens))
            work[name].append(run.final()["total_flos"])
        print(
            f"  throughput repeat {repeat + 1}: "
            + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in values.items())
        )
    comparisons = []
    for name in variants:
        padding = [b / f for b, f in zip(work["baseline"], work[name], strict=True)]
        comparisons.append(
            Comparison(
                f"useful tokens/s, {name} vs padding",
                "tokens/s",
                values[name],
                values["baseline"],
                ">= 2.0x",
                lambda r: r >= 2.0,
                f"{len(rows)} rows, {tokens} useful tokens per epoch, batch {batch}, max_length {length}; "
                f"model FLOPs baseline/flotilla (= tokens computed ratio) "
                f"{min(padding):.2f}/{median(padding):.2f}/{max(padding):.2f}",
            )
        )
    return comparisons


def measure_steps_and_start(sizes: Sizes, workspace: Workspace, tokenizer: Any) -> list[Comparison]:
    """(2) step time with the extras off and (3) command start to first step, from the same runs."""
    batch, length, steps = sizes.step_batch, sizes.step_length, sizes.step_steps
    rows = fixed_length_rows(tokenizer, batch * steps, length)
    data = write_jsonl(workspace.root / "fixed.jsonl", rows)
    baseline_options = {
        "data": data,
        "max_length": length,
        "batch_size": batch,
        "max_steps": steps,
        "seed": SEED,
        "learning_rate": LEARNING_RATE,
    }
    flotilla_runs, baseline_runs = [], []
    for repeat in range(sizes.repeats):
        flotilla_run, baseline_run = alternate(
            repeat,
            [
                partial(
                    run_flotilla,
                    "step-flotilla",
                    flotilla_spec(data, length, batch, SEED, max_steps=steps),
                    workspace,
                ),
                partial(run_baseline, "step-baseline", baseline_options, workspace),
            ],
        )
        flotilla_runs.append(flotilla_run)
        baseline_runs.append(baseline_run)
        print(
            f"  step/start repeat {repeat + 1}: step {step_seconds(flotilla_run):.2f}s vs "
            f"{step_seconds(baseline_run):.2f}s, start {start_to_first_step(flotilla_run):.1f}s vs "
            f"{start_to_first_step(baseline_run):.1f}s"
        )
    shape = f"batch {batch} x {length} tokens, {steps} steps"
    return [
        Comparison(
            "step time, extras off",
            "s/step",
            [step_seconds(r) for r in flotilla_runs],
            [step_seconds(r) for r in baseline_runs],
            "<= 1.03x",
            lambda r: r <= 1.03,
            f"{shape}; median of steps 2..{steps}",
        ),
        Comparison(
            "command start to first optimizer step",
            "s",
            [start_to_first_step(r) for r in flotilla_runs],
            [start_to_first_step(r) for r in baseline_runs],
            "<= 1.2x",
            lambda r: r <= 1.2,
            f"`flotilla run` vs `python bench/baseline_hf.py`, {shape}",
        ),
    ]


def measure_memory(sizes: Sizes, workspace: Workspace, tokenizer: Any) -> tuple[Comparison, dict[str, Any]]:
    """(4) peak RSS at ``memory_length`` tokens, gradient checkpointing on vs off (fresh process each)."""
    length, steps = sizes.memory_length, sizes.memory_steps
    data = write_jsonl(workspace.root / "long.jsonl", long_rows(tokenizer, steps, length))
    on, off, baseline, step_on, step_off = [], [], [], [], []
    for repeat in range(sizes.memory_repeats):
        sides = [
            partial(
                run_flotilla,
                "mem-gc-on",
                flotilla_spec(data, length, 1, SEED, max_steps=steps, gradient_checkpointing=True),
                workspace,
            ),
            partial(
                run_flotilla, "mem-gc-off", flotilla_spec(data, length, 1, SEED, max_steps=steps), workspace
            ),
        ]
        if sizes.memory_baseline:
            options = {"data": data, "max_length": length, "batch_size": 1, "max_steps": steps, "seed": SEED}
            sides.append(partial(run_baseline, "mem-baseline", options, workspace))
        runs = alternate(repeat, sides)
        on.append(runs[0].peak_rss_gib)
        off.append(runs[1].peak_rss_gib)
        if sizes.memory_baseline:
            baseline.append(runs[2].peak_rss_gib)
        if steps > 1:
            step_on.append(step_seconds(runs[0]))
            step_off.append(step_seconds(runs[1]))
        print(f"  memory repeat {repeat + 1}: GC on {on[-1]:.2f} GiB, GC off {off[-1]:.2f} GiB")
    comparison = Comparison(
        "peak RSS, gradient checkpointing on vs off",
        "GiB",
        on,
        off,
        ">= 30% less (ratio <= 0.70x)",
        lambda r: r <= 0.70,
        f"Flotilla, batch 1 x {length} tokens, {steps} step(s); whole-process high-water mark",
    )
    extra = {
        "baseline_peak_rss_gib": baseline,
        "gc_on_step_seconds": step_on,
        "gc_off_step_seconds": step_off,
    }
    return comparison, extra


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """What ran the benchmark, and how busy it was."""
    import torch
    import transformers

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
        "torch_threads": torch.get_num_threads(),
    }


def print_table(comparisons: list[Comparison]) -> None:
    header = (
        f"{'measure':<44} {'flotilla':>10} {'baseline':>10}  {'ratio min/median/max':<22} {'goal':<30} met"
    )
    print(header)
    print("-" * len(header))
    for comparison in comparisons:
        d = comparison.as_dict()
        low, mid, high = d["ratio_min_median_max"]
        print(
            f"{comparison.name:<44} {median(comparison.flotilla):>10.3f} {median(comparison.baseline):>10.3f}  "
            f"{low:.3f} / {mid:.3f} / {high:.3f}{'':<4} {comparison.goal:<30} {'yes' if d['met'] else 'NO'}"
        )
        if comparison.note:
            print(f"    {comparison.note}")


def make_workspace(keep: Path | None, threads: int) -> Workspace:
    """A scratch folder, the model folder both sides load, and the environment of every run."""
    from launcher.model.load import loadable_source
    from launcher.spec.models import ModelSpec

    root = keep or Path(tempfile.mkdtemp(prefix="flotilla-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    model_dir = Path(loadable_source(ModelSpec(path=MODEL_ALIAS)).name_or_path)
    script = Path(sys.executable).parent / "flotilla"
    flotilla = [str(script)] if script.is_file() else [sys.executable, "-m", "launcher.cli"]
    env = {**os.environ, **CHILD_ENV, "HF_DATASETS_CACHE": str(root / "hf-datasets-cache")}
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    return Workspace(root, model_dir, env, flotilla)


def main(argv: list[str] | None = None) -> int:
    """Run every comparison and print the table (and write JSON with --json)."""
    parser = argparse.ArgumentParser(description="Flotilla vs the plain Hugging Face baseline")
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (1 repeat, tiny sizes)")
    parser.add_argument("--repeats", type=int, help="override the number of repeats")
    parser.add_argument("--throughput-batch", type=int, help="override the batch of the tokens/s measure")
    parser.add_argument("--only", nargs="+", choices=["packing", "throughput", "steps", "memory"])
    parser.add_argument(
        "--group-by-length", action="store_true", help="also measure data.group_by_length (padding)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per training process, the same on both sides (default 1: on a shared machine "
        "more threads than free cores spin-wait and slow everything down many times over)",
    )
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--workdir", type=Path, help="keep runs and logs here (default: a temp folder)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(**{**asdict(sizes), "repeats": args.repeats})
    if args.throughput_batch:
        rows = max(sizes.throughput_rows, 2 * args.throughput_batch)  # two optimizer steps per epoch
        sizes = Sizes(**{**asdict(sizes), "throughput_batch": args.throughput_batch, "throughput_rows": rows})
    wanted = set(args.only or ["packing", "throughput", "steps", "memory"])

    import torch

    from launcher.model.load import load_tokenizer
    from launcher.spec.models import ModelSpec

    started = time.time()
    load_before = os.getloadavg()
    workspace = make_workspace(args.workdir, args.threads)
    torch.set_num_threads(args.threads)  # for the packing check in this process
    tokenizer = load_tokenizer(ModelSpec(path=MODEL_ALIAS))
    print(
        f"work folder {workspace.root}; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "sizes": asdict(sizes),
        "threads_per_process": args.threads,
        "command": " ".join(["python", "bench/compare.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    comparisons: list[Comparison] = []
    if "packing" in wanted:
        check = packing_check(tokenizer)
        results["packing_check"] = check
        print(f"packing check: {check['losses']} -> {'equal' if check['equal'] else 'NOT EQUAL'}")
    if "throughput" in wanted:
        comparisons += measure_throughput(sizes, workspace, tokenizer, args.group_by_length)
    if "steps" in wanted:
        comparisons += measure_steps_and_start(sizes, workspace, tokenizer)
    if "memory" in wanted:
        comparison, results["memory_extra"] = measure_memory(sizes, workspace, tokenizer)
        comparisons.append(comparison)
    load_after = os.getloadavg()
    results.update(
        machine=machine(),
        load_average_start=load_before,
        load_average_end=load_after,
        wall_seconds=time.time() - started,
        comparisons=[c.as_dict() for c in comparisons],
    )
    print()
    print_table(comparisons)
    print(
        f"\nwall time {results['wall_seconds']:.0f} s; load average at start {load_before[0]:.2f}, "
        f"at end {load_after[0]:.2f} (1 min)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.workdir:
        shutil.rmtree(workspace.root, ignore_errors=True)
    packing_ok = results.get("packing_check", {}).get("equal", True)
    return 0 if packing_ok else 1


if __name__ == "__main__":
    sys.exit(main())
