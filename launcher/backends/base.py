"""The small interface every backend implements, and the registry that picks one by name."""

from __future__ import annotations

import importlib
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
    "ray": "launcher.backends.ray",
    "slurm": "launcher.backends.slurm",
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
