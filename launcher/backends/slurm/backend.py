"""The Slurm backend: sbatch a generated script; status, logs and cancel through Slurm's CLI.

Slurm's own states map to Flotilla's :data:`~launcher.backends.base.STATES`. The job's
``squeue --json`` record is asked first, then ``scontrol show job`` (no JSON support), then
accounting (``sacct``, or ``sacct -c`` for job-completion records without slurmdbd), and last
the run directory (``summary.json`` and the batch script's ``slurm-events.jsonl``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from rich.console import Console

from launcher.atomic import write_owner_only
from launcher.backends.base import RunHandle, follow_logs, write_job_record
from launcher.backends.slurm.script import ArrayJob, render_script, script_context
from launcher.errors import BackendError, FlotillaError
from launcher.plan import Plan
from launcher.redact import redact_text
from launcher.rundir import run_state

#: Slurm job states (``squeue``, ``scontrol``, ``sacct``) as Flotilla states.
SLURM_STATES = {
    "PENDING": "PENDING",
    "SUSPENDED": "PENDING",
    "CONFIGURING": "RUNNING",
    "RUNNING": "RUNNING",
    "COMPLETING": "RUNNING",
    "STAGE_OUT": "RUNNING",
    "SIGNALING": "RUNNING",
    "RESIZING": "RUNNING",
    "REQUEUED": "REQUEUED",
    "REQUEUE_FED": "REQUEUED",
    "REQUEUE_HOLD": "REQUEUED",
    "PREEMPTED": "REQUEUED",
    "COMPLETED": "SUCCEEDED",
    "CANCELLED": "CANCELLED",
    "REVOKED": "CANCELLED",
    "FAILED": "FAILED",
    "TIMEOUT": "FAILED",
    "NODE_FAIL": "FAILED",
    "OUT_OF_MEMORY": "FAILED",
    "BOOT_FAIL": "FAILED",
    "DEADLINE": "FAILED",
}
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
#: Where Slurm clients find their configuration when SLURM_CONF is unset.
DEFAULT_CONFIGS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/run/slurm/conf/slurm.conf")
EVENTS = "slurm-events.jsonl"
POLL_SECONDS = 2.0


def flotilla_state(slurm_state: str, restarts: int = 0) -> str:
    """Flotilla's state for a Slurm state (``PENDING`` after a restart is ``REQUEUED``)."""
    state = SLURM_STATES.get(slurm_state.split()[0].split("+")[0] if slurm_state else "", "UNKNOWN")
    return "REQUEUED" if state == "PENDING" and restarts > 0 else state


def slurm_command(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client (``sbatch``, ``squeue``...) and capture its output; raise if it is missing."""
    if not (
        os.environ.get("SLURM_CONF")
        or os.environ.get("FLOTILLA_SLURM_CONFIGLESS")
        or any(Path(path).is_file() for path in DEFAULT_CONFIGS)
    ):
        raise BackendError(
            "no Slurm configuration: set SLURM_CONF (for the dev cluster: `. STATE_DIR/env.sh`), "
            "or FLOTILLA_SLURM_CONFIGLESS=1 on a configless cluster"
        )
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise BackendError(
            f"{args[0]} not found: is this a Slurm login node (Slurm's CLI on PATH)?"
        ) from None
    except subprocess.TimeoutExpired:
        raise BackendError(f"{' '.join(args)} did not answer within {timeout:.0f} s") from None


class SlurmBackend:
    """Batch jobs on a Slurm cluster: one task per node, torchrun inside each."""

    name = "slurm"

    def render(self, plan: Plan) -> str:
        """The sbatch script (``flotilla submit --dry-run``)."""
        return render_script(plan)

    def launch(self, plan: Plan, console: Console, wait: bool = True) -> RunHandle:
        run_dir = Path(plan.run_dir)
        if re.search(r"\s", str(run_dir)):
            raise FlotillaError(f"the run directory {run_dir} contains whitespace, which sbatch cannot take")
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        script = run_dir / "job.sbatch"
        text = render_script(plan)
        if redact_text(text) != text:  # setup lines that export a secret: readable by the owner only
            write_owner_only(script, text.encode())
        else:
            script.write_text(text, encoding="utf-8")
        submitted = time.time()
        result = slurm_command(["sbatch", "--parsable", str(script)])
        if result.returncode != 0:
            raise BackendError(f"sbatch refused the job: {result.stderr.strip() or result.stdout.strip()}")
        job_id = result.stdout.strip().split(";")[0]
        console.print(
            f"submitted Slurm job {job_id}: {plan.nodes} node(s) × {plan.processes_per_node} process(es)"
        )
        handle = RunHandle(
            self.name, run_dir, job_id, details={"submitted": f"{submitted:.3f}", "script": str(script)}
        )
        write_job_record(handle)  # also for `flotilla run`, which waits: status and logs by run dir
        if wait:
            handle.exit_code = 0 if self._wait(job_id, run_dir, console) == "SUCCEEDED" else 1
        return handle

    def launch_array(
        self, plans: dict[int, Plan], name: str, workdir: Path, limit: int | None, console: Console
    ) -> str:
        """Submit one job array whose task ``i`` trains ``plans[i]``'s run directory, at most
        ``limit`` tasks at once; each run directory records its task (``<array id>_<i>``)."""
        first = next(iter(plans.values()))
        shared = _task_options(first)
        for index, plan in plans.items():
            theirs = _task_options(plan)
            differ = sorted(k for k in shared if shared[k] != theirs[k])
            if differ:
                raise FlotillaError(
                    f"a Slurm job array runs every task with the same sbatch options, but task {index} "
                    f"differs in {', '.join(differ)}: keep resources.* and slurm.* out of the sweep"
                )
        if re.search(r"\s", str(workdir)):
            raise FlotillaError(f"the folder {workdir} contains whitespace, which sbatch cannot take")
        for plan in plans.values():
            (Path(plan.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
        array = ArrayJob(name, {i: p.run_dir for i, p in plans.items()}, str(workdir), limit)
        script = workdir / "array.sbatch"
        text = render_script(first, array)
        if redact_text(text) != text:
            write_owner_only(script, text.encode())
        else:
            script.write_text(text, encoding="utf-8")
        result = slurm_command(["sbatch", "--parsable", str(script)])
        if result.returncode != 0:
            raise BackendError(
                f"sbatch refused the job array: {result.stderr.strip() or result.stdout.strip()}"
            )
        array_id = result.stdout.strip().split(";")[0]
        console.print(
            f"submitted Slurm job array {array_id}: {len(plans)} task(s), at most {limit or 'all'} at once"
        )
        for index, plan in plans.items():
            write_job_record(
                RunHandle(self.name, Path(plan.run_dir), f"{array_id}_{index}", details={"array": array_id})
            )
        return array_id

    def status(self, job_id: str, run_dir: Path | None = None) -> str:
        record = queue_record(job_id)
        if record is not None:
            return flotilla_state(record["state"], int(record.get("restarts", 0)))
        state = accounting_state(job_id)
        if state is not None:
            return flotilla_state(state)
        return run_state(run_dir, EVENTS) if run_dir else "UNKNOWN"

    def logs(self, job_id: str, run_dir: Path | None = None, follow: bool = False) -> str:
        run_dir = run_dir or self._run_dir_of(job_id)
        if not follow:
            return "".join(
                f"==> {label}: {path} <==\n{path.read_text(errors='replace')}\n"
                for label, path in log_files(job_id, run_dir)
            )
        follow_logs(
            lambda: log_files(job_id, run_dir),
            lambda: self.status(job_id, run_dir) in FINAL_STATES,
            POLL_SECONDS / 2,
        )
        return ""

    def cancel(self, job_id: str, run_dir: Path | None = None) -> None:
        state = self.status(job_id, run_dir)
        if state in FINAL_STATES:
            raise FlotillaError(f"Slurm job {job_id} has already ended ({state})")  # a request, not a fault
        result = slurm_command(["scancel", job_id])
        if result.returncode != 0:
            raise BackendError(f"scancel {job_id} failed: {result.stderr.strip()}")

    def _run_dir_of(self, job_id: str) -> Path:
        record = queue_record(job_id)
        if record is None or not record.get("work_dir"):
            raise FlotillaError(f"Slurm no longer knows job {job_id}; pass its run directory instead")
        return Path(record["work_dir"])

    def _wait(self, job_id: str, run_dir: Path, console: Console) -> str:
        """Poll until the job ends, printing each change of state."""
        last = ""
        while True:
            state = self.status(job_id, run_dir)
            if state != last:
                console.print(f"job {job_id}: {state}")
                last = state
            if state in FINAL_STATES:
                return state
            time.sleep(POLL_SECONDS)


def queue_record(job_id: str) -> dict[str, str] | None:
    """The controller's record of a job (state, restarts, work dir), or None once it is forgotten."""
    result = slurm_command(["squeue", "--json", f"--jobs={job_id}", "--states=all"])
    if result.returncode == 0 and result.stdout.lstrip().startswith("{"):
        jobs = json.loads(result.stdout).get("jobs", [])
        for job in jobs:
            if job_id in (str(job.get("job_id")), _task_name(job)) or _pending_task(job, job_id):
                state = job.get("job_state", "")
                return {
                    "state": state[0] if isinstance(state, list) else state,
                    "restarts": str(job.get("restart_cnt", 0)),
                    "work_dir": job.get("current_working_directory", ""),
                }
        return None
    result = slurm_command(["scontrol", "show", "job", "-o", job_id])
    if result.returncode != 0:
        return None
    fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
    return {
        "state": fields.get("JobState", ""),
        "restarts": fields.get("Restarts", "0"),
        "work_dir": fields.get("WorkDir", ""),
    }


def _task_options(plan: Plan) -> dict[str, object]:
    """What a job array's tasks must share: the script's variables except the run directory's."""
    return {k: v for k, v in script_context(plan).items() if k not in ("run_dir", "workdir", "output")}


def _number(value: object) -> int | None:
    """A number of ``squeue --json`` (a plain number, or ``{"set": .., "number": ..}`` in newer Slurm)."""
    if isinstance(value, dict):
        return int(value["number"]) if value.get("set") else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _task_name(job: dict[str, object]) -> str | None:
    """``<array id>_<index>`` of a job array's task, None for other jobs."""
    array, index = _number(job.get("array_job_id")), _number(job.get("array_task_id"))
    return f"{array}_{index}" if array and index is not None else None


def _pending_task(job: dict[str, object], job_id: str) -> bool:
    """Whether ``job_id`` (``A_i``) is among the array's tasks still pending in one record
    (``array_task_string``: ``2-3%2``, ``1,4``)."""
    array, _, index = job_id.partition("_")
    if not index.isdigit() or str(_number(job.get("array_job_id"))) != array:
        return False
    text = str(job.get("array_task_string") or "").split("%")[0]
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        high, _, step = high.partition(":")
        if (
            low.isdigit()
            and int(low) <= int(index) <= int(high or low)
            and (int(index) - int(low)) % int(step or 1) == 0
        ):
            return True
    return False


def accounting_state(job_id: str) -> str | None:
    """The job's final state from accounting (``sacct``), else job-completion records (``sacct -c``)."""
    for extra in ([], ["-c"]):
        result = slurm_command(["sacct", *extra, "-j", job_id, "-X", "-n", "-P", "-o", "State"])
        lines = result.stdout.strip().splitlines()
        if result.returncode == 0 and lines:
            return lines[-1]
    return None


def log_files(job_id: str, run_dir: Path) -> list[tuple[str, Path]]:
    """The batch script's output, then each node's output, as (label, path)."""
    batch = [("batch", run_dir / f"slurm-{job_id}.out")]
    nodes = sorted((run_dir / "logs").glob("node*.log"), key=lambda p: int(p.stem[4:] or 0))
    return [(label, path) for label, path in batch if path.is_file()] + [(p.stem, p) for p in nodes]


BACKEND = SlurmBackend()
