"""User-facing errors: each carries a message fit to print without a traceback, and its exit code.

Exit codes of every Flotilla command and training process:
0 finished; 1 a runtime failure (a process, daemon or engine failed); 2 bad input (spec, data, paths,
arguments: fix it, a retry cannot help); 3 a checkpoint, adapter or export failed its verification;
85 stopped on a signal after a checkpoint, "requeue me".
"""

from __future__ import annotations

RUNTIME_FAILURE_EXIT_CODE = 1
BAD_INPUT_EXIT_CODE = 2
VERIFICATION_FAILED_EXIT_CODE = 3
#: Exit code of a run that stopped on SIGTERM/SIGUSR1 after saving a checkpoint: "requeue me".
REQUEUE_EXIT_CODE = 85


class FlotillaError(Exception):
    """Base of every error Flotilla reports to a user as a clear message: bad input unless a
    subclass says otherwise."""

    exit_code = BAD_INPUT_EXIT_CODE
    #: Whether the same job can succeed when retried (an infrastructure fault, not bad input):
    #: Ray's ``max_failures`` and Slurm's requeue retry these, never bad input.
    retryable = False


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

    exit_code = VERIFICATION_FAILED_EXIT_CODE
    retryable = True


class ExportError(FlotillaError):
    """An exported model, reloaded from disk, does not match the model it was exported from."""

    exit_code = VERIFICATION_FAILED_EXIT_CODE


class BackendError(FlotillaError):
    """A backend could not start, reach or control a job, or a process of the job failed."""

    exit_code = RUNTIME_FAILURE_EXIT_CODE
    retryable = True
