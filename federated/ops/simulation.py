"""``flotilla fed simulate``: every site of a federation on this machine (Flower's simulation engine).

The ServerApp runs in this process; each site is a virtual SuperNode whose ClientApp runs in a Ray
actor and calls the train core on the site's own job spec. Outputs go to the same work directory a
deployed server writes (``<output>/<name>/``), with the sites' round run dirs under ``sites/<name>/``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from federated.client_app import Site, build_client_app
from federated.server_app import build_server_app
from federated.spec import FederationSpec
from launcher.backends import pin_loopback
from launcher.errors import FlotillaError
from launcher.processes import StopRequests


def simulated_sites(fed: FederationSpec, work_dir: Path) -> list[Site]:
    """The federation's sites, each with its round run dirs under ``work_dir/sites/<name>``."""
    if not fed.sites:
        raise FlotillaError(
            "fed simulate: the federation spec lists no `sites:` (site name -> local job spec)"
        )
    missing = [job for job in fed.sites.values() if not Path(job).is_file()]
    if missing:
        raise FlotillaError(f"fed simulate: site job spec(s) not found: {', '.join(missing)}")
    return [Site(name, Path(job), work_dir / "sites" / name) for name, job in fed.sites.items()]


def simulate(
    fed: FederationSpec,
    work_dir: Path,
    num_cpus: int = 2,
    cpus_per_site: int = 1,
    extra_mods: Sequence[Callable[..., Any]] = (),
) -> None:
    """Run (or resume) the federation with one virtual SuperNode per site; blocks until done."""
    from flwr.simulation import run_simulation

    sites = simulated_sites(fed, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    client = build_client_app(sites, extra_mods)
    ray_dir = Path(tempfile.mkdtemp(prefix="flotilla-ray-"))
    backend = {"client_resources": {"num_cpus": cpus_per_site}}
    try:
        with StopRequests(_stop_now) as stop:
            _start_ray(num_cpus, ray_dir)
            stop.install()  # ray.init took SIGTERM over
            run_simulation(build_server_app(fed, work_dir), client, len(sites), backend_config=backend)
    finally:
        _stop_ray()
        shutil.rmtree(ray_dir, ignore_errors=True)


class SimulationStopped(BaseException):
    """A stop signal ended the simulation (a BaseException: Flower's handlers of Exception let it
    through, and ends its ServerApp thread on the way out)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _stop_now(signum: int) -> None:
    raise SimulationStopped(signum)


def _start_ray(num_cpus: int, temp_dir: Path) -> None:
    """Ray for the simulation, on 127.0.0.1 only (Flower's own start would take the machine's
    outward address), with the PYTHONPATH its actors need to import the apps, as Flower sets it."""
    import ray

    pin_loopback("127.0.0.1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        num_cpus=num_cpus,
        _temp_dir=str(temp_dir),
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
