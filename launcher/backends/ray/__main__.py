"""Entry point of a submitted Ray Job: ``python -m launcher.backends.ray <run dir>``.

Trains the run on the cluster the job runs in (``$RAY_ADDRESS``, else ``auto``). Exit codes as
:func:`launcher.backends.ray.workers.fit`: 0 finished, 85 stopped early, 2 bad input, 1 failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from launcher.backends.ray.backend import ask_workers_to_stop
from launcher.backends.ray.workers import drive
from launcher.errors import BAD_INPUT_EXIT_CODE, FlotillaError
from launcher.plan import reopen_run
from launcher.processes import StopRequests
from launcher.rundir import clear_stop_request


def main(argv: list[str] | None = None) -> int:
    """Train the run directory given on the command line on this job's Ray cluster."""
    args = sys.argv[1:] if argv is None else argv
    console = Console(stderr=True, highlight=False)
    if len(args) != 1:
        console.print("usage: python -m launcher.backends.ray <run dir>")
        return BAD_INPUT_EXIT_CODE
    try:
        plan = reopen_run(Path(args[0])).plan
        run_dir = Path(plan.run_dir)
        clear_stop_request(run_dir)
        # `ray job stop` sends SIGTERM: the workers checkpoint before the job ends
        with StopRequests(lambda signum: ask_workers_to_stop(run_dir, console, signum)) as stop:
            return drive(plan, os.environ.get("RAY_ADDRESS", "auto"), console, None, stop)
    except FlotillaError as exc:
        console.print("[red]error:[/]", escape(str(exc)))
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
