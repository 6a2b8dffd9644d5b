"""The data step at scale: the datasets pipeline and its cache against the row-by-row implementation.

    python bench/data_prep.py --rows 100000 --json bench/results/data_prep.json

Rows of realistic lengths are generated from the shipped ``realistic_lengths.jsonl`` (instruction:
each row once per copy, numbered so dedup keeps it; chat: two of them as a four-turn conversation
with a system prompt). Every measurement is a fresh process that loads the tokenizer (SmolLM2's, not
timed) and then times ``prepare_data``. Memory is the peak anonymous PSS of the process and its
tokenizing workers (sampled every 50 ms from /proc/PID/smaps_rollup; PSS shares the pages a forked
worker has in common with its parent): memory-mapped Arrow pages are file-backed and reclaimable, so
they are left out (``maxrss_mib``, which counts them, is kept too). The reference is the row-by-row
implementation exactly as it was at ``REFERENCE_COMMIT``, extracted from git (not copied), so both
sides run on the same data, tokenizer, seed and threads. Sides, per format and size:

- ``reference``: the row-by-row implementation (every rank, every restart pays this);
- ``prepare``: the pipeline with an empty cache, one process and ``--workers`` processes;
- ``cached``: the pipeline with the cache filled, i.e. a second rank, a resume, a requeue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REFERENCE_COMMIT = "cc4a801"
SOURCE = REPO / "configs" / "data" / "realistic_lengths.jsonl"

#: Run in a fresh interpreter: prepare once, print seconds and peak RSS as JSON.
CHILD = """
import json, resource, sys, threading, time
from pathlib import Path
import psutil
from launcher.data import prepare_data
from launcher.model import load_tokenizer
from launcher.spec import DataSpec, ModelSpec

def anonymous_mib(process):
    with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) / 1024
    return 0.0

def sample(peak, done):
    me = psutil.Process()
    while not done.is_set():
        total = 0.0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += anonymous_mib(process)
            except OSError:
                pass
        peak[0] = max(peak[0], total)
        done.wait(0.05)

data_spec, cache, reference = json.loads(sys.argv[1])
tokenizer = load_tokenizer(ModelSpec(path="smollm2-135m-instruct"))
spec = DataSpec.model_validate(data_spec)
before = anonymous_mib(psutil.Process())
peak, done = [before], threading.Event()
sampler = threading.Thread(target=sample, args=(peak, done), daemon=True)
sampler.start()
started = time.perf_counter()
data = prepare_data(spec, tokenizer, 7) if reference else prepare_data(spec, tokenizer, 7, Path(cache))
seconds = time.perf_counter() - started
done.set()
sampler.join()
rows = len(data.train) + (len(data.validation) if data.validation is not None else 0)
print(json.dumps({
    "seconds": seconds, "rows": rows,
    "anon_before_mib": before, "anon_peak_mib": peak[0], "anon_step_mib": peak[0] - before,
    "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def generate(fmt: str, rows: int, folder: Path) -> Path:
    """``rows`` rows of ``fmt`` built from the shipped realistic-length rows, all distinct."""
    path = folder / f"{fmt}-{rows}.jsonl"
    if path.is_file():
        return path
    base = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    with path.open("w", encoding="utf-8") as out:
        for index in range(rows):
            first = base[index % len(base)]
            if fmt == "instruction":
                row: dict[str, Any] = {
                    "prompt": f"{first['prompt']} (#{index})",
                    "response": first["response"],
                }
            else:
                second = base[(index * 7 + 3) % len(base)]
                row = {
                    "messages": [
                        {"role": "system", "content": f"You are a careful assistant (session {index})."},
                        {"role": "user", "content": first["prompt"]},
                        {"role": "assistant", "content": first["response"]},
                        {"role": "user", "content": second["prompt"]},
                        {"role": "assistant", "content": second["response"]},
                    ]
                }
            out.write(json.dumps(row) + "\n")
    return path


def reference_tree(folder: Path) -> Path:
    """The launcher package as it was at ``REFERENCE_COMMIT``, extracted under ``folder``."""
    archive = subprocess.run(
        ["git", "archive", REFERENCE_COMMIT, "launcher"], cwd=REPO, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def measure(data_spec: dict[str, Any], cache: Path | None, tree: Path) -> dict[str, Any]:
    """One fresh process preparing ``data_spec`` with the launcher found under ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argument = json.dumps([data_spec, str(cache) if cache else None, cache is None])
    done = subprocess.run(
        [sys.executable, "-c", CHILD, argument],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--formats", nargs="+", default=["instruction", "chat"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--compare-up-to",
        type=int,
        default=200_000,
        help="rows; above this only the pipeline with --workers runs (the reference needs ~15 min per 1M rows)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flotilla-data-bench-") as scratch:
        work = Path(scratch)
        old = reference_tree(work / "reference")
        for rows in args.rows:
            for fmt in args.formats:
                data_spec = {
                    "train": str(generate(fmt, rows, work)),
                    "format": fmt,
                    "max_length": 1024,
                    "validation_ratio": 0.01,
                }
                sides: dict[str, dict[str, Any]] = {}
                compared = rows <= args.compare_up_to
                if compared:
                    sides["reference"] = measure(data_spec, None, old)
                for workers in sorted({1, args.workers}) if compared else [args.workers]:
                    cache = work / f"cache-{fmt}-{rows}-{workers}"
                    sides[f"prepare_{workers}proc"] = measure({**data_spec, "num_proc": workers}, cache, REPO)
                    if workers == args.workers:
                        sides["cached"] = measure({**data_spec, "num_proc": workers}, cache, REPO)
                row = {"format": fmt, "rows": rows, "sides": sides}
                results.append(row)
                print(json.dumps(row), flush=True)
    payload = {
        "command": " ".join(["python", "bench/data_prep.py", *sys.argv[1:]]),
        "reference_commit": REFERENCE_COMMIT,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
