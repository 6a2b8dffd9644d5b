"""The run directory every backend writes: spec, plan, manifest, metrics, checkpoints, adapter."""

from __future__ import annotations

import getpass
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.atomic import write_json_atomic

TRACKED_PACKAGES = (
    "flotilla",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "deepspeed",
    "ray",
    "flwr",
)


def new_run_dir(output_dir: str, name: str) -> Path:
    """``<output_dir>/<name>/<timestamp>``, made unique if two runs start in the same second."""
    base = Path(output_dir) / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = base / stamp
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = base / f"{stamp}-{suffix}"
    candidate.mkdir(parents=True)
    return candidate.resolve()


def write_manifest(run_dir: Path, seed: int, fingerprints: dict[str, str], extra: dict[str, Any]) -> None:
    """manifest.json: versions, git sha, data fingerprints, seed, host and command."""
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "user": _user(),
        "packages": package_versions(),
        "git_sha": git_sha(),
        "seed": seed,
        "data_fingerprints": fingerprints,
        **extra,
    }
    write_json_atomic(run_dir / "manifest.json", manifest)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's numbers."""
    versions = {}
    for package in TRACKED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_sha() -> str | None:
    """The commit of the working directory's git checkout, if any (``+dirty`` when modified)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file of a run (metrics.jsonl, scheduler events); a missing file has none.

    A torn last line (a writer killed mid-line) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


#: Final events of a scheduler's batch script (slurm-events.jsonl) as Flotilla states.
FINAL_EVENTS = {"failed": "FAILED", "requeued": "REQUEUED", "stopped": "CANCELLED"}


def run_state(run_dir: Path, events: str | None = None) -> str:
    """A run's state read from its directory, for backends without a scheduler to ask, or whose
    scheduler has forgotten the job.

    ``summary.json`` means finished. With ``events`` (the batch script's event log), the last event
    decides, and a run whose script never logged an end is UNKNOWN; without, metrics mean RUNNING and
    a plan alone PENDING.
    """
    if (run_dir / "summary.json").is_file():
        return "SUCCEEDED"
    if events is not None:
        logged = read_jsonl(run_dir / events)
        return FINAL_EVENTS.get(logged[-1]["event"], "UNKNOWN") if logged else "UNKNOWN"
    if (run_dir / "metrics.jsonl").is_file():
        return "RUNNING"
    return "PENDING" if (run_dir / "plan.json").is_file() else "UNKNOWN"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


#: Where a hung run's stacks and diagnosis go (:mod:`launcher.train.watchdog`).
HANG_FOLDER = "hang"
HANG_DIAGNOSIS = "diagnosis.txt"


def hang_diagnosis(run_dir: Path) -> str | None:
    """What the hang watchdog found, if this run's last attempt hung."""
    path = Path(run_dir) / HANG_FOLDER / HANG_DIAGNOSIS
    return path.read_text(encoding="utf-8") if path.is_file() else None


#: A stop request a launcher leaves for ranks it cannot signal (Ray Train workers): checkpoint, exit.
STOP_REQUEST = "stop-requested"


def request_stop(run_dir: Path) -> None:
    """Ask every rank of the run to checkpoint and stop at its next step end."""
    (Path(run_dir) / STOP_REQUEST).touch()


def clear_stop_request(run_dir: Path) -> None:
    """Forget an earlier attempt's stop request (before the run starts again)."""
    (Path(run_dir) / STOP_REQUEST).unlink(missing_ok=True)
