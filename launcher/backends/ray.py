"""The Ray backend: Ray Train workers on a Ray cluster, run from here or submitted as a Ray Job.

``ray.address`` picks the cluster: ``local`` starts a private Ray on 127.0.0.1 for the run and stops
it afterwards; ``auto``, ``host:port`` and ``ray://host:port`` connect this process to a running
cluster as the driver; ``http://head:8265`` goes through the Ray Jobs API (``flotilla run`` then
submits the job and follows its logs). ``flotilla submit`` always goes through the Jobs API.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rich.console import Console

from launcher.backends.base import JOB_RECORD, RunHandle, write_job_record
from launcher.backends.local import free_port
from launcher.errors import BackendError
from launcher.plan import Plan
from launcher.spec import RaySpec, ResourcesSpec

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
#: How long a private head may take to come up (2 busy cores: ~15 s).
HEAD_START_TIMEOUT_S = 180.0
#: How often a followed job is polled.
POLL_S = 2.0
#: Ray swaps 127.0.0.1 for the machine's outward address unless this is "0" (one-machine cluster).
ONE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass
class RayHead:
    """A Ray head bound to 127.0.0.1 with its own temp dir; ``ray start --block`` stops it all on SIGTERM."""

    process: subprocess.Popen[bytes]
    temp_dir: Path
    address: str
    dashboard_url: str | None

    @classmethod
    def start(cls, num_cpus: int, dashboard: bool = True, timeout: float = HEAD_START_TIMEOUT_S) -> RayHead:
        """Start a head with ``num_cpus`` CPUs (GPUs detected) and wait until it accepts drivers.

        The dashboard also serves the state API, which Ray Train uses to clean up after a driver.
        """
        temp_dir = Path(tempfile.mkdtemp(prefix="flotilla-ray-"))
        port, dashboard_port = free_port(), free_port()
        ports = {
            "--port": port,
            "--ray-client-server-port": free_port(),
            "--dashboard-port": dashboard_port,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
            f"--include-dashboard={str(dashboard).lower()}",
            "--disable-usage-stats",
            *(f"{flag}={value}" for flag, value in ports.items()),
        ]
        env = {
            **os.environ,
            ONE_MACHINE_ENV: "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        log = temp_dir / "head.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        head = cls(
            process,
            temp_dir,
            f"127.0.0.1:{port}",
            f"http://127.0.0.1:{dashboard_port}" if dashboard else None,
        )
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                head.stop()
                raise BackendError(f"could not start a private Ray head on 127.0.0.1:\n{tail}")
            time.sleep(0.5)
        return head

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the ``ray start`` process (it stops every Ray process it started), SIGKILL if stuck."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def worker_resources(res: ResourcesSpec) -> dict[str, float]:
    """What each Ray Train worker reserves."""
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    return per_worker


def job_entrypoint(run_dir: str | Path) -> str:
    """The shell command a submitted Ray Job runs on the cluster."""
    return f"python -m launcher.ray_train {shlex.quote(str(run_dir))}"


def is_jobs_address(address: str) -> bool:
    """True for the HTTP address of a Ray Jobs API (``http://head:8265``)."""
    return urlsplit(address).scheme in ("http", "https")


def connect(address: str, runtime_env: dict[str, Any] | None) -> None:
    """Make this process a driver of the Ray cluster at ``address`` (clear error if none answers)."""
    if address != "auto":
        host, port = _host_port(address)
        _pin_loopback(host)
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise BackendError(f"no Ray cluster reachable at ray.address={address!r}: {exc}") from None
    import ray

    try:
        with warnings.catch_warnings():
            # A notice about a future default of GPU visibility, printed on every connect.
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
            ray.init(address=address, runtime_env=runtime_env or None, logging_level="WARNING")
    except ConnectionError as exc:
        raise BackendError(f"no Ray cluster reachable at ray.address={address!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise BackendError(f"ray.runtime_env was refused: {exc}") from None


def check_resources(plan: Plan, address: str) -> None:
    """Refuse, before starting, a worker count the cluster cannot place (asked vs what it has)."""
    import ray

    res = plan.job_spec().resources
    workers, cpus, gpus = plan.world_size, res.cpus_per_worker, res.gpus_per_worker
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]

    def room(node: dict[str, float]) -> int:
        slots = int(node.get("CPU", 0) // cpus)
        return min(slots, int(node.get("GPU", 0) // gpus)) if gpus else slots

    fits = sum(room(node) for node in nodes)
    if fits < workers:
        has_cpus = sum(node.get("CPU", 0) for node in nodes)
        has_gpus = sum(node.get("GPU", 0) for node in nodes)
        raise BackendError(
            f"resources.workers={workers} × (cpus_per_worker={cpus}, gpus_per_worker={gpus}) asks for "
            f"{workers * cpus} CPUs and {workers * gpus} GPUs; the Ray cluster at {address} has "
            f"{has_cpus:g} CPUs and {has_gpus:g} GPUs on {len(nodes)} node(s), room for {fits} such "
            "worker(s): lower resources.workers or add nodes"
        )


def check_runtime_env(runtime_env: dict[str, Any]) -> None:
    """Set up ``ray.runtime_env`` once in a tiny task, so a broken one fails here and clearly."""
    import ray
    from ray.exceptions import RuntimeEnvSetupError

    if set(runtime_env) <= {"env_vars"}:
        return

    @ray.remote(num_cpus=0)
    def ready() -> bool:
        return True

    try:
        ray.get(ready.remote())
    except RuntimeEnvSetupError as exc:
        causes = [line for line in str(exc).splitlines() if line.strip() and not line[0].isspace()]
        message = "\n".join(line for line in causes[-3:] if not line.startswith("Traceback"))
        raise BackendError(f"ray.runtime_env could not be set up on the cluster:\n{message}") from None


def drive(plan: Plan, address: str, console: Console, runtime_env: dict[str, Any] | None) -> int:
    """Connect, check the cluster can hold the job, run Ray Train to the end, disconnect; exit code."""
    connect(address, runtime_env)
    import ray

    from launcher.ray_train import fit

    try:
        check_resources(plan, address)
        check_runtime_env(runtime_env or {})
        return fit(plan, console)
    finally:
        ray.shutdown()


def jobs_client(address: str | None) -> JobSubmissionClient:
    """A Ray Jobs API client (``address`` may also be ``auto`` or a GCS ``host:port``)."""
    if address:
        _pin_loopback(urlsplit(address if "://" in address else f"tcp://{address}").hostname)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "RAY_ADDRESS / the local cluster"
        raise BackendError(f"no Ray Jobs API reachable at {where}: {exc}") from None


class RayBackend:
    """Ray Train on a Ray cluster: private (``local``), joined as driver, or through the Jobs API."""

    name = "ray"

    def launch(self, plan: Plan, console: Console, wait: bool = True) -> RunHandle:
        settings = plan.job_spec().ray or RaySpec()
        run_dir = Path(plan.run_dir)
        runtime_env = dict(settings.runtime_env)
        if not wait:
            return self._submit(plan, settings.address, runtime_env)
        if settings.address == "local":
            cpus = settings.num_cpus or plan.world_size * plan.job_spec().resources.cpus_per_worker
            console.print(f"starting a private Ray head on 127.0.0.1 with {cpus} CPUs")
            started = time.monotonic()
            head = RayHead.start(cpus)
            console.print(f"Ray is up after {time.monotonic() - started:.1f} s at {head.address}")
            try:
                code = drive(plan, head.address, console, runtime_env)
            finally:
                head.stop()
        elif is_jobs_address(settings.address):
            handle = self._submit(plan, settings.address, runtime_env)
            write_job_record(handle)
            console.print(f"submitted Ray job {handle.job_id} to {handle.details['address']}")
            code = self._follow(handle, console)
        else:
            code = drive(plan, settings.address, console, runtime_env)
        return RunHandle(self.name, run_dir, exit_code=code)

    def _submit(self, plan: Plan, address: str, runtime_env: dict[str, Any]) -> RunHandle:
        if address == "local":
            raise BackendError(
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
            raise BackendError(f"Ray at {client.get_address()} has no job {job_id}: {exc}") from None
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
            raise BackendError(f"Ray at {client.get_address()} has no job {job_id}: {exc}") from None
        if info.message and JOB_STATES.get(str(info.status.value)) == "FAILED":
            text += f"\n[ray] {info.message}\n"
        return text

    def cancel(self, job_id: str, run_dir: Path | None = None) -> None:
        client = self._client(run_dir)
        try:
            stopped = client.stop_job(job_id)
        except RuntimeError as exc:
            raise BackendError(f"Ray at {client.get_address()} has no job {job_id}: {exc}") from None
        if not stopped:
            raise BackendError(f"Ray job {job_id} had already ended ({self.status(job_id, run_dir)})")

    @staticmethod
    def _client(run_dir: Path | None) -> JobSubmissionClient:
        """The Jobs API the run was submitted to (job.json), else RAY_ADDRESS / the local cluster."""
        record = run_dir / JOB_RECORD if run_dir else None
        address = json.loads(record.read_text()).get("address") if record and record.is_file() else None
        return jobs_client(address)


def _pin_loopback(host: str | None) -> None:
    """Keep Ray on 127.0.0.1 when the cluster is on this machine's loopback."""
    if host in LOOPBACK:
        os.environ[ONE_MACHINE_ENV] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: Ray may be imported already


def _host_port(address: str) -> tuple[str, int]:
    """Host and port of ``host:port`` or ``ray://host:port``."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or parts.port is None:
        raise BackendError(f"ray.address={address!r} needs a host and a port (e.g. 10.0.0.1:6379)")
    return parts.hostname, parts.port


BACKEND = RayBackend()
