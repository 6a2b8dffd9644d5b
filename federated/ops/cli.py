"""``flotilla fed simulate | server | site | keys | report``: federated fine-tuning from the CLI."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from rich.console import Console

from federated.fingerprints import base_model_sha256, code_sha256
from federated.ops import deploy
from federated.ops.keys import create_trial_keys
from federated.ops.report import problems, rounds_table, summary_table
from federated.rounds import RoundStore
from federated.sites import forget_enrollment, revoke_site, revoked_sites, site_names
from federated.spec import FederationSpec, load_federation, load_site
from launcher.backends import free_port
from launcher.errors import REQUEUE_EXIT_CODE, BackendError, FlotillaError
from launcher.plan import load_job
from launcher.processes import run_process_group

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)
Handler = Callable[[argparse.Namespace], int]


def add_commands(sub: argparse._SubParsersAction, commands: dict[str, Handler]) -> None:
    """Add the ``fed`` sub-parser and register its handler in ``commands``."""
    fed = sub.add_parser("fed", help="federated LoRA fine-tuning with Flower (only adapters travel)")
    fed_sub = fed.add_subparsers(dest="fed_command", required=True)

    p = fed_sub.add_parser("simulate", help="run every site of a federation on this machine")
    _spec_args(p, "federation spec (fed.yaml)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs for the simulation engine (default 2)")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPUs one site may use (default 1)")

    p = fed_sub.add_parser(
        "server", help="coordinator: a SuperLink (TLS, enrolled sites only) + the ServerApp"
    )
    _spec_args(p, "federation spec (fed.yaml)")

    p = fed_sub.add_parser("site", help="one organization: a SuperNode training on its own data")
    p.add_argument("spec", help="site spec (site.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--port", type=int, default=None, help="local port of the SuperNode's runtime API")

    p = fed_sub.add_parser("keys", help="create a CA, server certificate and site keys for a trial")
    p.add_argument("out_dir", help="folder to write ca.crt, server.crt/.key and sites/<site>.key/.pub")
    p.add_argument("--site", action="append", required=True, dest="sites", help="site name (repeat)")
    p.add_argument("--host", action="append", default=[], dest="hosts", help="extra server name/IP (repeat)")
    p.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    p.add_argument("--force", action="store_true", help="replace existing keys")

    p = fed_sub.add_parser("revoke", help="remove a site's enrollment: its key is refused from now on")
    _spec_args(p, "federation spec (fed.yaml)")
    p.add_argument("--site", required=True, help="the site whose key to revoke")

    p = fed_sub.add_parser(
        "fingerprint", help="sha256 of the base model and the code, as a site's policy pins them"
    )
    p.add_argument("spec", help="site spec (site.yaml: its job's model) or federation spec (fed.yaml)")

    p = fed_sub.add_parser("report", help="per-round, per-site tables of a federation work dir")
    p.add_argument("work_dir")

    handlers = {
        "simulate": cmd_simulate,
        "server": cmd_server,
        "site": cmd_site,
        "keys": cmd_keys,
        "report": cmd_report,
        "revoke": cmd_revoke,
        "fingerprint": cmd_fingerprint,
    }
    commands["fed"] = lambda args: _needs_flower(handlers[args.fed_command], args)


def _needs_flower(handler: Handler, args: argparse.Namespace) -> int:
    """Run a ``fed`` command; without Flower installed, say how to install it."""
    try:
        return handler(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "flwr":
            raise
        raise FlotillaError(
            "flotilla fed needs Flower, which is not installed: pip install 'flotilla[federated]'"
        ) from None


def _spec_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("spec", help=what)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    parser.add_argument(
        "--work-dir", help="where rounds go (default <output>/<name>); an existing one resumes"
    )


def _load(args: argparse.Namespace) -> tuple[FederationSpec, Path]:
    from federated.strategy import build_strategy  # flwr: only when a command runs

    fed = load_federation(Path(args.spec), args.overrides)
    build_strategy(fed)  # Flower's own parameter checks (DP), before anything starts
    work_dir = Path(args.work_dir).resolve() if args.work_dir else Path(fed.output) / fed.name
    work_dir.mkdir(parents=True, exist_ok=True)
    return fed, work_dir


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run (or resume) a federation with the simulation engine and print its tables.

    The simulation runs in a driver process of its own, waited for with everything it starts
    (:func:`run_process_group`): a stop signal reaches the job's processes as SIGUSR1, the driver
    kills its Ray processes, and this process exits 85 once none is left, whatever the driver's code.
    """
    _, work_dir = _load(args)
    _say_resume(RoundStore(work_dir))
    started = time.time()
    driver = [sys.executable, "-m", "federated.ops.simulation", args.spec, *args.overrides]
    driver += [
        "--work-dir",
        str(work_dir),
        "--cpus",
        str(args.cpus),
        "--cpus-per-site",
        str(args.cpus_per_site),
    ]
    code = run_process_group(driver)
    if code == REQUEUE_EXIT_CODE:
        done = RoundStore(work_dir).last_completed() or 0
        kept = f"rounds 1-{done} are kept; " if done else ""
        console.print(
            f"stopped: Ray is stopped; {kept}the federation resumes after round {done} with: "
            f"flotilla fed simulate {args.spec}"
        )
        return code
    if code:
        return code  # the driver said why
    _print_tables(work_dir)
    out.print(f"simulation finished in {time.time() - started:.0f} s; work dir: {work_dir}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """Start a SuperLink, enroll the site keys, run the federation, stop the SuperLink."""
    fed, work_dir = _load(args)
    _stop_on_sigterm()
    store = RoundStore(work_dir)
    _say_resume(store)
    files = deploy.server_files(fed)
    spec_file = work_dir / "federation-spec.json"
    spec_file.write_text(fed.model_dump_json(indent=2), encoding="utf-8")
    superlink = deploy.start_superlink(fed, work_dir, files)
    env = deploy.flower_env(work_dir / "flwr-home")
    enrolled = len({key.stem for key in files.enrolled} - revoked_sites(work_dir)) if files else 0
    console.print(
        f"SuperLink on {fed.server.host}:{fed.server.port}, {enrolled} site key(s) enrolled (log {superlink.log})"
    )
    try:
        run_id = deploy.submit_run(deploy.write_app(work_dir / "app"), spec_file, work_dir, env)
        console.print(f"run {run_id} started; waiting for sites (flwr log {run_id} {deploy.CONNECTION})")
        seen = [store.last_completed() or 0]

        def progress() -> None:
            done = store.last_completed() or 0
            if done > seen[0]:
                seen[0] = done
                console.print(f"round {done} committed")

        status, details = deploy.follow_run(run_id, superlink, env, progress)
        (work_dir / "serverapp.log").write_text(deploy.server_log(run_id, env), encoding="utf-8")
    finally:
        superlink.stop()
    _print_tables(work_dir)
    if status != "finished:completed":
        raise BackendError(
            f"run {run_id} ended {status}: {details} (ServerApp log: {work_dir / 'serverapp.log'})"
        )
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    """Run this organization's SuperNode until it is stopped (Ctrl-C) or refused."""
    site = load_site(Path(args.spec), args.overrides)
    _stop_on_sigterm()
    Path(site.work_dir).mkdir(parents=True, exist_ok=True)
    node = deploy.start_supernode(site, args.port or free_port())
    console.print(
        f"site {site.site}: SuperNode connecting to {site.superlink} (log {node.log}); Ctrl-C to stop"
    )
    try:
        code = node.process.wait()
    except KeyboardInterrupt:
        node.stop()
        return 0
    node.stop()
    if code == 0:
        return 0
    if deploy.refused(node):
        raise FlotillaError(
            f"site {site.site}: the SuperLink at {site.superlink} refused this SuperNode: its public key "
            f"is not enrolled there (or the certificate does not match)\n{node.tail(8)}"
        )
    raise BackendError(f"site {site.site}: the SuperNode exited with code {code}\n{node.tail(12)}")


def cmd_keys(args: argparse.Namespace) -> int:
    """Write trial keys and say who gets which file."""
    keys = create_trial_keys(Path(args.out_dir), args.sites, args.hosts, args.days, args.force)
    out.print(f"CA certificate   {keys.ca_cert}   (give to every site)")
    out.print(f"server TLS       {keys.server_cert}, {keys.server_key}   (coordinator only)")
    for site, (private, public) in keys.site_keys.items():
        out.print(f"site {site:<10}  {private} (that site only), {public} (enrolled by the server)")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a site: unregistered now if the SuperLink runs, else when ``fed server`` next starts."""
    _, work_dir = _load(args)
    nodes = {site: node for node, site in site_names(work_dir).items()}
    revoke_site(work_dir, args.site)
    node = nodes.get(args.site)
    done = deploy.unregister(node, deploy.flower_env(work_dir / "flwr-home")) if node is not None else None
    if done:
        forget_enrollment(work_dir, node)
        out.print(
            f"revoked {args.site}: node {node} unregistered; its key is refused from its next connection",
            soft_wrap=True,
        )
    else:
        out.print(
            f"revoked {args.site}: its key is unregistered and never enrolled again when `fed server` starts",
            soft_wrap=True,
        )
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """Print the ``policy.fingerprints`` block for this installation and the spec's base model."""
    path = Path(args.spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        data = None  # the federation loader below reports what is wrong with the file
    is_site = isinstance(data, dict) and "site" in data
    model = load_job(Path(load_site(path).job), []).model if is_site else load_federation(path).model
    pins = {"policy": {"fingerprints": {"base_model": base_model_sha256(model), "code": code_sha256()}}}
    print(f"# {model.path} and the code installed here ({sys.executable})")  # YAML to paste: unwrapped
    print(yaml.safe_dump(pins, sort_keys=False).rstrip())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the tables of an existing work dir."""
    work_dir = Path(args.work_dir)
    if not (work_dir / "checkpoints").is_dir():
        raise FlotillaError(f"{work_dir} is not a federation work dir (no checkpoints/)")
    _print_tables(work_dir)
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM ends like Ctrl-C, so the Flower processes started here are stopped too."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _say_resume(store: RoundStore) -> None:
    done = store.last_completed()
    if done:
        console.print(f"resuming after round {done} ({store.work_dir})")


def _print_tables(work_dir: Path) -> None:
    rows = RoundStore(work_dir).rows()
    out.print(rounds_table(rows))
    for line in problems(rows):
        out.print(line, markup=False)
    out.print(summary_table(rows))
    adapters = sorted(work_dir.glob("round-[0-9][0-9][0-9]"))
    if adapters:
        out.print(f"global adapters (PEFT folders): {adapters[0]} ... {adapters[-1].name}")
