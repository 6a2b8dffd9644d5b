"""``flotilla fed simulate``: every site of a federation on this machine (Flower's simulation engine).

The ServerApp runs in this process; each site is a virtual SuperNode whose ClientApp runs in a Ray
actor and calls the train core on the site's own job spec. Outputs go to the same work directory a
deployed server writes (``<output>/<name>/``), with the sites' round run dirs under ``sites/<name>/``.

``flotilla fed simulate`` runs :func:`main` in a process of its own (``python -m
federated.ops.simulation``) and waits for it and everything it started: Ray can end its driver with
exit code 1 on a stop (a Flower thread touching the core worker after the raylet died or after
``ray.shutdown()``), so only the CLI, which holds no Ray state, decides the exit code (85 on a stop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from federated.client_app import Site, build_client_app
from federated.server_app import build_server_app
from federated.spec import FederationSpec, load_federation
from launcher.backends import pin_loopback
from launcher.errors import REQUEUE_EXIT_CODE, FlotillaError
from launcher.processes import StopRequests, process_tree, stop_processes


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
    """Run (or resume) the federation with one virtual SuperNode per site; blocks until done.

    A stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1) ends this process: Ray's processes are killed
    and the exit code is 85. Rounds already committed are on disk; the round in flight is redone on
    resume.
    """
    from flwr.simulation import run_simulation

    sites = simulated_sites(fed, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    client = build_client_app(sites, extra_mods)
    ray_dir = Path(tempfile.mkdtemp(prefix="flotilla-ray-"))
    backend = {"client_resources": {"num_cpus": cpus_per_site}}

    def stop_now(signum: int) -> None:
        _end_ray_processes(ray_dir)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(REQUEUE_EXIT_CODE)

    try:
        with StopRequests(stop_now) as stop:
            _start_ray(num_cpus, ray_dir)
            stop.install()  # ray.init took SIGTERM over
            run_simulation(build_server_app(fed, work_dir), client, len(sites), backend_config=backend)
    finally:
        _stop_ray()
        shutil.rmtree(ray_dir, ignore_errors=True)


def _end_ray_processes(ray_dir: Path) -> None:
    """Kill every process this one started (Ray's daemons, and the sites' actors below them), by PID.

    Ray is not shut down in-process on a stop: Flower's threads are inside Ray calls then (the
    ServerApp awaiting replies, its executor in ``ray.get``), and one that touches Ray after
    ``ray.shutdown()`` ends the process with exit code 1 ("The core worker has already been
    shutdown"). Nor could interpreter exit wait for those threads: they never end once Ray is gone.
    """
    stop_processes(process_tree(os.getpid())[1:], kill=True)
    shutil.rmtree(ray_dir, ignore_errors=True)


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


def main(argv: list[str] | None = None) -> int:
    """``python -m federated.ops.simulation SPEC [OVERRIDES] --work-dir DIR``: the simulation's driver
    process, started by ``flotilla fed simulate`` (which loaded and checked the spec already)."""
    parser = argparse.ArgumentParser(prog="python -m federated.ops.simulation")
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--cpus-per-site", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        fed = load_federation(Path(args.spec), args.overrides)
        simulate(fed, Path(args.work_dir), num_cpus=args.cpus, cpus_per_site=args.cpus_per_site)
    except FlotillaError as exc:
        Console(stderr=True, highlight=False).print("[red]error:[/]", escape(str(exc)))
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
