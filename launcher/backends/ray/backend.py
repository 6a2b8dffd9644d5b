"""The Ray backend: Ray Train workers on a Ray cluster, run from here or submitted as a Ray Job.

``ray.address`` picks the cluster: ``local`` starts a private Ray on 127.0.0.1 for the run and stops
it afterwards; ``auto``, ``host:port`` and ``ray://host:port`` connect this process to a running
cluster as the driver; ``http://head:8265`` goes through the Ray Jobs API (``flotilla run`` then
submits the job and follows its logs). ``flotilla submit`` always goes through the Jobs API.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from launcher.backends.base import JOB_RECORD, RunHandle, write_job_record
from launcher.backends.ray.cluster import RayHead, is_jobs_address, jobs_client, worker_resources
from launcher.backends.ray.tune import TuneRequest, tune_trials
from launcher.errors import BackendError, FlotillaError
from launcher.plan import Plan
from launcher.processes import StopRequests
from launcher.redact import restore_secrets
from launcher.rundir import clear_stop_request, request_stop
from launcher.spec import RaySpec

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

#: Ray job states in Flotilla's words.
JOB_STATES = {
    "PENDING": "PENDING",
    "RUNNING": "RUNNING",
    "STOPPED": "CANCELLED",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
}
FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")
#: How often a followed job is polled.
POLL_S = 2.0


def ask_workers_to_stop(run_dir: Path, console: Console, signum: int) -> None:
    """The first stop signal: every worker checkpoints at its next step end, then the run ends (85)."""
    request_stop(run_dir)
    console.print(
        f"signal {signum}: the workers checkpoint at their next step and stop; a second signal aborts"
    )


def job_entrypoint(run_dir: str | Path) -> str:
    """The shell command a submitted Ray Job runs on the cluster."""
    return f"python -m launcher.backends.ray {shlex.quote(str(run_dir))}"


class RayBackend:
    """Ray Train on a Ray cluster: private (``local``), joined as driver, or through the Jobs API."""

    name = "ray"

    def launch(self, plan: Plan, console: Console, wait: bool = True) -> RunHandle:
        settings = plan.job_spec().ray or RaySpec()
        run_dir = Path(plan.run_dir)
        runtime_env = dict(settings.runtime_env)
        if isinstance(runtime_env.get("env_vars"), dict):  # plan.json keeps no secret: a resume needs it
            runtime_env["env_vars"] = restore_secrets(runtime_env["env_vars"], "ray.runtime_env.env_vars")
        if not wait:
            return self._submit(plan, settings.address, runtime_env)
        # the workers bring transformers and the train core: only when this process drives a run
        from launcher.backends.ray.workers import drive

        if is_jobs_address(settings.address):
            handle = self._submit(plan, settings.address, runtime_env)
            write_job_record(handle)
            console.print(f"submitted Ray job {handle.job_id} to {handle.details['address']}")
            return RunHandle(self.name, run_dir, exit_code=self._follow(handle, console))
        clear_stop_request(run_dir)
        with StopRequests(lambda signum: ask_workers_to_stop(run_dir, console, signum)) as stop:
            if settings.address != "local":
                return RunHandle(
                    self.name, run_dir, exit_code=drive(plan, settings.address, console, runtime_env, stop)
                )
            cpus = settings.num_cpus or plan.world_size * plan.job_spec().resources.cpus_per_worker
            console.print(f"starting a private Ray head on 127.0.0.1 with {cpus} CPUs")
            started = time.monotonic()
            head = RayHead.start(cpus)
            try:
                console.print(f"Ray is up after {time.monotonic() - started:.1f} s at {head.address}")
                code = drive(plan, head.address, console, runtime_env, stop)
            finally:
                head.stop()  # also after a second stop signal: no Ray process outlives the run
        return RunHandle(self.name, run_dir, exit_code=code)

    def _submit(self, plan: Plan, address: str, runtime_env: dict[str, Any]) -> RunHandle:
        if address == "local":
            raise FlotillaError(
                "flotilla submit --backend ray needs a running Ray cluster: set ray.address to its Jobs "
                "API (http://head:8265), 'auto' or its host:port ('local' starts a private Ray only for "
                "flotilla run)"
            )
        client = jobs_client(address)
        run_dir = Path(plan.run_dir)
        try:
            job_id = client.submit_job(
                entrypoint=job_entrypoint(run_dir),
                runtime_env=runtime_env or None,
                metadata={"flotilla_run_dir": str(run_dir), "flotilla_job": plan.spec["name"]},
            )
        except (RuntimeError, ValueError, TypeError) as exc:
            raise BackendError(f"the Ray cluster at {client.get_address()} refused the job: {exc}") from None
        return RunHandle(self.name, run_dir, job_id=job_id, details={"address": client.get_address()})

    def _follow(self, handle: RunHandle, console: Console) -> int:
        """Print a submitted job's logs as they grow until it ends; its exit code (cancel on Ctrl-C)."""
        assert handle.job_id is not None
        client = jobs_client(handle.details["address"])
        shown = 0
        try:
            while True:
                state = self.status(handle.job_id, handle.run_dir)
                text = client.get_job_logs(handle.job_id)
                console.file.write(text[shown:])
                console.file.flush()
                shown = len(text)
                if state in FINISHED:
                    break
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            client.stop_job(handle.job_id)
            raise
        info = client.get_job_info(handle.job_id)
        if state == "SUCCEEDED":
            return 0
        console.print(f"Ray job {handle.job_id} ended {state}: {info.message or ''}")
        return info.driver_exit_code or 1

    def tune(
        self,
        plans: list[Plan],
        metric: str,
        mode: str,
        scheduler: str,
        max_concurrent: int | None,
        tune_dir: Path,
        console: Console,
    ) -> dict[str, str]:
        """Run ``plans`` as the trials of one Ray Tune search (:mod:`launcher.backends.ray.tune`):
        each run directory -> ``finished``, ``stopped`` (by the scheduler) or ``failed: <why>``."""
        request = TuneRequest(plans, metric, mode, scheduler, max_concurrent, tune_dir)
        return tune_trials(request, console)

    def render(self, plan: Plan) -> str:
        """What ``flotilla submit --backend ray --dry-run`` would send to the Ray Jobs API."""
        spec = plan.job_spec()
        settings = spec.ray or RaySpec()
        job = {
            "address": settings.address,
            "entrypoint": job_entrypoint(plan.run_dir),
            "runtime_env": settings.runtime_env,
            "workers": plan.world_size,
            "resources_per_worker": worker_resources(spec.resources),
            "max_failures": settings.max_failures,
        }
        return json.dumps(job, indent=2)

    def status(self, job_id: str, run_dir: Path | None = None) -> str:
        client = self._client(run_dir)
        try:
            state = client.get_job_status(job_id)
        except RuntimeError as exc:
            raise FlotillaError(f"Ray at {client.get_address()} has no job {job_id}: {exc}") from None
        return JOB_STATES.get(str(state.value), "UNKNOWN")

    def logs(self, job_id: str, run_dir: Path | None = None, follow: bool = False) -> str:
        client = self._client(run_dir)
        if follow:
            record = RunHandle(
                self.name, run_dir or Path("."), job_id, details={"address": client.get_address()}
            )
            self._follow(record, Console(file=sys.stdout))
            return ""
        try:
            text = client.get_job_logs(job_id)
            info = client.get_job_info(job_id)
        except RuntimeError as exc:
            raise FlotillaError(f"Ray at {client.get_address()} has no job {job_id}: {exc}") from None
        if info.message and JOB_STATES.get(str(info.status.value)) == "FAILED":
            text += f"\n[ray] {info.message}\n"
        return text

    def cancel(self, job_id: str, run_dir: Path | None = None) -> None:
        client = self._client(run_dir)
        try:
            stopped = client.stop_job(job_id)
        except RuntimeError as exc:
            raise FlotillaError(f"Ray at {client.get_address()} has no job {job_id}: {exc}") from None
        if not stopped:
            raise FlotillaError(f"Ray job {job_id} had already ended ({self.status(job_id, run_dir)})")

    @staticmethod
    def _client(run_dir: Path | None) -> JobSubmissionClient:
        """The Jobs API the run was submitted to (job.json), else RAY_ADDRESS / the local cluster."""
        record = run_dir / JOB_RECORD if run_dir else None
        address = json.loads(record.read_text()).get("address") if record and record.is_file() else None
        return jobs_client(address)


BACKEND = RayBackend()
