"""The sbatch script of a plan, rendered from ``slurm/job.sbatch.j2``."""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import jinja2

import launcher
from launcher.backends.commands import WORKER_MODULE, launcher_command
from launcher.errors import REQUEUE_EXIT_CODE
from launcher.plan import Plan
from launcher.spec import SlurmSpec

TEMPLATE = Path(launcher.__file__).resolve().parent.parent / "slurm" / "job.sbatch.j2"
#: Without resources.master_port, each job's rendezvous port is PORT_BASE + job id % PORT_SPAN:
#: below Linux's ephemeral range (32768+) and apart from the dev cluster's Slurm ports.
PORT_BASE = 20000
PORT_SPAN = 10000
#: What each node of the job runs (this package's ``__main__``).
NODE_MODULE = "launcher.backends.slurm"


def slurm_settings(plan: Plan) -> SlurmSpec:
    """The plan's ``slurm:`` section, or the defaults when the spec has none."""
    return SlurmSpec.model_validate(plan.spec.get("slurm") or {})


def render_script(plan: Plan, array: ArrayJob | None = None) -> str:
    """The batch script that runs ``plan`` on ``plan.nodes`` nodes; with ``array``, a job array
    whose every task runs one of the array's run directories (the plans differ in nothing else)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    environment.filters["q"] = shlex.quote
    context = script_context(plan)
    if array is not None:
        context.update(array_context(array))
    return environment.get_template(TEMPLATE.name).render(context)


@dataclasses.dataclass(frozen=True)
class ArrayJob:
    """A job array: task index -> run directory, a shared working folder, at most ``limit`` at once."""

    name: str
    runs: dict[int, str]
    workdir: str
    limit: int | None = None


def array_context(array: ArrayJob) -> dict[str, Any]:
    """The template's variables for a job array (``--array=1,3,4%2``)."""
    indexes = ",".join(str(i) for i in sorted(array.runs))
    return {
        "job_name": array.name,
        "array": indexes + (f"%{array.limit}" if array.limit else ""),
        "array_runs": sorted(array.runs.items()),
        "workdir": array.workdir,
        "output": f"{array.workdir}/slurm-%A_%a.out",
        "run_dir": "$RUN_DIR",
    }


def script_context(plan: Plan) -> dict[str, Any]:
    """The template's variables, all derived from the plan."""
    slurm = slurm_settings(plan)
    resources = plan.spec["resources"]
    options = [
        f"--{name}={value}"
        for name, value in (
            ("partition", slurm.partition),
            ("account", slurm.account),
            ("qos", slurm.qos),
            ("mem", slurm.mem),
            ("constraint", slurm.constraint),
        )
        if value
    ]
    if resources.get("gpus_per_node"):
        options.append(f"--gpus-per-node={resources['gpus_per_node']}")
    port = resources.get("master_port")
    return {
        "job_name": plan.spec["name"],
        "nodes": plan.nodes,
        "nproc_per_node": plan.processes_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "time": slurm.time,
        "run_dir": plan.run_dir,
        "workdir": plan.run_dir,
        "output": f"{plan.run_dir}/slurm-%j.out",
        "array": None,
        "array_runs": [],
        "grace": slurm.signal_grace_seconds,
        "requeue": slurm.requeue,
        "max_restarts": slurm.max_restarts,
        "requeue_code": REQUEUE_EXIT_CODE,
        "options": options + slurm.extra_sbatch,
        "setup": slurm.setup or default_setup(),
        "master_port": port or f"$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
        "launcher": "deepspeed" if resources.get("launcher") == "deepspeed" else "torchrun",
        "deepspeed_command": deepspeed_command(plan),
        "node_module": NODE_MODULE,
        "worker_module": WORKER_MODULE,
    }


def deepspeed_command(plan: Plan) -> str:
    """DeepSpeed's launcher for one node (its rank from ``$SLURM_NODEID``), quoted for ``bash -c '...'``."""
    command = launcher_command(
        dataclasses.replace(plan, run_dir="$RUN_DIR"),
        rank_source="slurm",
        master_addr="$MASTER_ADDR",
        master_port="$MASTER_PORT",
        hostfile=Path("$RUN_DIR/hostfile"),
        node_rank="$SLURM_NODEID",
        python="python",
    )
    return " ".join(_double_quoted(arg) for arg in command)


def _double_quoted(arg: str) -> str:
    """``arg`` as a word inside single quotes: ``$VAR`` values in double quotes, others as they are."""
    flag, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if "$" in value:
        return f'{flag}{sep}"{value}"'
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else f'"{arg}"'


def default_setup() -> list[str]:
    """Put the interpreter that submitted the job first on PATH (its venv, with Flotilla in it)."""
    bin_dir = Path(sys.executable).parent
    return [f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"  # the interpreter that submitted this job']
