"""Entry point of one training process: ``python -m launcher.train <run dir>``.

Exit codes (launcher.errors): 0 finished, 85 stopped on a signal after a checkpoint, 2 invalid input,
1 a runtime failure, 3 a failed save verification; each error reported as a message, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console

from launcher.errors import BAD_INPUT_EXIT_CODE, REQUEUE_EXIT_CODE, FlotillaError
from launcher.processes import QUIET_ENV
from launcher.train.core import run_training


def main(argv: list[str] | None = None) -> int:
    """Run the train core for the run directory given on the command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m launcher.train <run dir>", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    console = Console(stderr=True)
    try:
        outcome = run_training(Path(args[0]), Console(stderr=True, quiet=os.environ.get(QUIET_ENV) == "1"))
    except FlotillaError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return exc.exit_code
    return REQUEUE_EXIT_CODE if outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
