"""A Ray cluster as the ray backend uses it: a private head on loopback, connecting as a driver,
checking that the cluster can hold the job, and the Ray Jobs API client."""

from __future__ import annotations

import os
import shutil
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

from launcher.backends.commands import free_ports
from launcher.errors import BackendError, FlotillaError
from launcher.plan import Plan
from launcher.processes import stop_processes
from launcher.spec import ResourcesSpec

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

#: How long a private head may take to come up (2 busy cores: ~15 s).
HEAD_START_TIMEOUT_S = 180.0
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
        flags = (
            "--port",
            "--ray-client-server-port",
            "--dashboard-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
        )
        ports = dict(zip(flags, free_ports(len(flags)), strict=True))
        port, dashboard_port = ports["--port"], ports["--dashboard-port"]
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
            # Inherited by every Ray process of this head: code in them that looks the cluster up
            # (Ray Train's placement-group cleaner asks the state API with no address) finds this
            # one, not "multiple active Ray instances" when another cluster runs on the machine.
            "RAY_ADDRESS": f"127.0.0.1:{port}",
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
        stop_processes([self.process.pid], grace)
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def worker_resources(res: ResourcesSpec) -> dict[str, float]:
    """What each Ray Train worker reserves."""
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    return per_worker


def is_jobs_address(address: str) -> bool:
    """True for the HTTP address of a Ray Jobs API (``http://head:8265``)."""
    return urlsplit(address).scheme in ("http", "https")


def connect(address: str, runtime_env: dict[str, Any] | None) -> None:
    """Make this process a driver of the Ray cluster at ``address`` (clear error if none answers)."""
    if address != "auto":
        host, port = _host_port(address)
        pin_loopback(host)
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
        raise FlotillaError(f"ray.runtime_env was refused: {exc}") from None


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
        raise FlotillaError(  # the job asks for more than the cluster has: fix the spec, not a fault
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
        raise FlotillaError(f"ray.runtime_env could not be set up on the cluster:\n{message}") from None


def jobs_client(address: str | None) -> JobSubmissionClient:
    """A Ray Jobs API client (``address`` may also be ``auto`` or a GCS ``host:port``)."""
    if address:
        pin_loopback(urlsplit(address if "://" in address else f"tcp://{address}").hostname)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "RAY_ADDRESS / the local cluster"
        raise BackendError(f"no Ray Jobs API reachable at {where}: {exc}") from None


def pin_loopback(host: str | None) -> None:
    """Keep Ray on 127.0.0.1 when the cluster is on this machine's loopback."""
    if host in LOOPBACK:
        os.environ[ONE_MACHINE_ENV] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: Ray may be imported already


def _host_port(address: str) -> tuple[str, int]:
    """Host and port of ``host:port`` or ``ray://host:port``."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or parts.port is None:
        raise FlotillaError(f"ray.address={address!r} needs a host and a port (e.g. 10.0.0.1:6379)")
    return parts.hostname, parts.port
