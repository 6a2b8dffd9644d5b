"""User-facing errors: each carries a message fit to print without a traceback."""

from __future__ import annotations

#: Exit code of a run that stopped on SIGTERM/SIGUSR1 after saving a checkpoint: "requeue me".
REQUEUE_EXIT_CODE = 85
#: Exit code of a run whose input (spec, data, paths) is invalid.
BAD_INPUT_EXIT_CODE = 2


class FlotillaError(Exception):
    """Base of every error Flotilla reports to a user as a clear message."""


class SpecError(FlotillaError):
    """The job spec is invalid; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun} in the job spec:\n{lines}")


class DataError(FlotillaError):
    """A data file is missing, unreadable or has a bad row."""


class CheckpointError(FlotillaError):
    """A checkpoint or adapter failed to save, or failed its verification."""


class BackendError(FlotillaError):
    """A backend could not start, reach or control a job."""
