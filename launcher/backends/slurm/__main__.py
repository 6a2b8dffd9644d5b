"""What each node of a Slurm job runs (one ``srun`` task per node).

``python -m launcher.backends.slurm torchrun <torchrun arguments>``
    torchrun's elastic agent, in this process. torchrun turns every worker failure into exit
    code 1; here a stop for requeue exits with :data:`~launcher.errors.REQUEUE_EXIT_CODE` (the
    workers exited with it, or this agent was signalled and passed the signal on) and a crash
    with the worker's own code.

``python -m launcher.backends.slurm deepspeed <DeepSpeed launcher command>``
    DeepSpeed's per-node launcher as a child (``launcher.processes.run_process_group``). The
    launchers inherit SIGUSR1 as ignored (only the training processes handle it, to checkpoint); a
    stop signal sent here goes to every process of the job, and this process waits until all of them
    have exited, so that no worker is killed by the end of the Slurm step while it saves; then it
    removes the node's DeepSpeed allreduce segments.
"""

from __future__ import annotations

import os
import socket
import sys

from launcher.backends.commands import SHM_SEGMENTS, release_shared_memory
from launcher.errors import BAD_INPUT_EXIT_CODE, REQUEUE_EXIT_CODE
from launcher.processes import run_process_group


def exit_code_of(failure_codes: list[int]) -> int:
    """The node's exit code from its workers' codes: requeue if any asked for it, else the first."""
    if REQUEUE_EXIT_CODE in failure_codes:
        return REQUEUE_EXIT_CODE
    code = failure_codes[0] if failure_codes else 1
    return code if 0 < code < 256 else 128 + abs(code)


def run_torchrun(argv: list[str]) -> int:
    """torchrun's agent for this node, its outcome mapped to an exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    say(
        f"node_rank={args.node_rank} nnodes={args.nnodes} nproc_per_node={args.nproc_per_node} "
        f"master={args.master_addr}:{args.master_port} "
        f"command: {args.training_script} {' '.join(args.training_script_args)}"
    )
    try:
        run(args)
    except ChildFailedError as exc:
        return exit_code_of([failure.exitcode for failure in exc.failures.values()])
    except SignalException as exc:
        say(f"stopped by signal {exc.sigval}; the workers were told to checkpoint")
        return REQUEUE_EXIT_CODE
    return 0


def run_deepspeed(command: list[str]) -> int:
    """DeepSpeed's per-node launcher in its own process group (signals forwarded, all of it awaited)."""
    say(f"command: {' '.join(command)}")
    code = run_process_group(command)
    options = dict(arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--master_"))
    if {"master_addr", "master_port"} <= options.keys():
        addr, port = options["master_addr"], options["master_port"]
        release_shared_memory(SHM_SEGMENTS.format(uid=os.getuid(), addr=addr, port=port))
    if code == REQUEUE_EXIT_CODE:
        say("stopped by a signal; the workers were told to checkpoint")
    return exit_code_of([code]) if code else 0


def say(message: str) -> None:
    """One line on this node's log, prefixed with the node's name."""
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(f"flotilla: node={node} {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``torchrun ARGS...`` or ``deepspeed COMMAND...``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["torchrun"]:
        return run_torchrun(args[1:])
    if args[:1] == ["deepspeed"] and len(args) > 1:
        return run_deepspeed(args[1:])
    print("usage: python -m launcher.backends.slurm torchrun ARGS... | deepspeed COMMAND...", file=sys.stderr)
    return BAD_INPUT_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
