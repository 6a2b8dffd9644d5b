"""The small interface every backend implements, and the registry that picks one by name."""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rich.console import Console

from launcher.errors import FlotillaError
from launcher.plan import Plan

#: Flotilla's job states, shared by every backend.
STATES = ("PENDING", "RUNNING", "REQUEUED", "SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN")


@dataclass
class RunHandle:
    """A started job: where it writes, the backend's id for it, and its exit code once known."""

    backend: str
    run_dir: Path
    job_id: str | None = None
    exit_code: int | None = None
    details: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    """Where processes start and how they find each other."""

    def launch(self, plan: Plan, console: Console, wait: bool = True) -> RunHandle:
        """Start the job (and, with ``wait``, block until it ends)."""
        ...

    def status(self, job_id: str, run_dir: Path | None = None) -> str:
        """One of :data:`STATES`."""
        ...

    def logs(self, job_id: str, run_dir: Path | None = None, follow: bool = False) -> str:
        """The job's output so far."""
        ...

    def cancel(self, job_id: str, run_dir: Path | None = None) -> None:
        """Stop the job."""
        ...


BACKEND_MODULES = {
    "local": "launcher.backends.local",
    "deepspeed": "launcher.backends.deepspeed",
    "ray": "launcher.backends.ray.backend",
    "slurm": "launcher.backends.slurm.backend",
}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (imported lazily: Ray and DeepSpeed are slow to import)."""
    if name not in BACKEND_MODULES:
        raise FlotillaError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_MODULES)}")
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ModuleNotFoundError as exc:
        raise FlotillaError(f"backend {name!r} is not available: {exc}") from None
    return module.BACKEND


JOB_RECORD = "job.json"


def write_job_record(handle: RunHandle) -> None:
    """Remember which backend and id a submitted run has, so commands can take the run dir."""
    record = {"backend": handle.backend, "job_id": handle.job_id, **handle.details}
    (handle.run_dir / JOB_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")


def find_job(job: str, backend_name: str | None) -> tuple[Backend, str, Path | None]:
    """Backend, job id and run directory from a run directory or a bare job id."""
    path = Path(job)
    if (path / JOB_RECORD).is_file():
        record = json.loads((path / JOB_RECORD).read_text())
        return get_backend(backend_name or record["backend"]), str(record["job_id"]), path
    if (path / "plan.json").is_file():
        return get_backend(backend_name or "local"), job, path
    if backend_name is None:
        if job.isdigit():
            backend_name = "slurm"
        elif job.startswith("raysubmit_"):
            backend_name = "ray"
        else:
            raise FlotillaError(f"{job!r} is neither a run directory nor a known job id; pass --backend")
    return get_backend(backend_name), job, None


def follow_logs(
    files: Callable[[], list[tuple[str, Path]]], finished: Callable[[], bool], poll: float
) -> None:
    """Print what the log ``files`` gain, each under a ``==> label: path <==`` header, until the job
    is ``finished`` (checked before the last read, so nothing written before the end is missed)."""
    offsets: dict[Path, int] = {}
    current: Path | None = None
    while True:
        final = finished()
        for label, path in files():
            with path.open("rb") as handle:
                handle.seek(offsets.get(path, 0))
                chunk = handle.read()
            if chunk:
                offsets[path] = offsets.get(path, 0) + len(chunk)
                if path != current:
                    sys.stdout.write(f"==> {label}: {path} <==\n")
                    current = path
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if final:
            return
        time.sleep(poll)
