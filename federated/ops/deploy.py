"""Deployment: start a SuperLink (+ the ServerApp run) or a SuperNode as real Flower processes.

``flotilla fed server``: ``flower-superlink`` with TLS and SuperNode authentication (only the site
keys enrolled with ``flwr supernode register`` may connect), then ``flwr run`` of the Flotilla app
with the federation spec; it follows the run's rounds and stops the SuperLink when the run ends.
``flotilla fed site``: ``flower-supernode`` with the site's CA certificate and node key; the node
config tells the ClientApp which local job spec (and data) to train on.

Every process is started here and stopped here by PID, with its descendants (SuperExec, apps).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from federated.sites import (
    enrollments,
    forget_enrollment,
    key_fingerprint,
    remember_enrollment,
    revoked_sites,
)
from federated.spec import FederationSpec, SiteSpec
from launcher.atomic import write_json_atomic
from launcher.errors import BackendError, FlotillaError
from launcher.processes import process_tree, stop_processes

#: The Flower app components (the same as ``[tool.flwr.app.components]`` in pyproject.toml).
SERVER_APP = "federated.server_app:app"
CLIENT_APP = "federated.client_app:app"
CONNECTION = "flotilla"
#: Flower's exit code for a SuperNode the SuperLink refused (e.g. its key is not enrolled).
SUPERNODE_REFUSED = 305
QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
APP_PYPROJECT = f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "flotilla-federated"
version = "0.1.0"
description = "Flotilla federated LoRA fine-tuning"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "flotilla"
fab-include = ["README.md"]

[tool.flwr.app.components]
serverapp = "{SERVER_APP}"
clientapp = "{CLIENT_APP}"

[tool.flwr.app.config]
federation = ""
work-dir = ""
"""


@dataclass
class Daemon:
    """A process started here, its log file, and how to stop it with everything it started."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    children: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def remember_children(self) -> None:
        """Note the PIDs it started so far (SuperExec, apps), to stop them even after it dies."""
        self.children |= set(process_tree(self.process.pid)[1:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; the same for the processes it started."""
        self.remember_children()
        processes = [self.process.pid, *sorted(self.children)]
        stop_processes(processes, timeout)
        self.process.wait(timeout=timeout)

    def tail(self, lines: int = 30) -> str:
        """The end of its log."""
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: their own FLWR_HOME, no telemetry, no runtime installs."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **QUIET, "FLWR_HOME": str(flwr_home)}


def start_daemon(name: str, command: list[str], env: dict[str, str], log: Path) -> Daemon:
    """Start ``command`` with its output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("ab")
    try:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise FlotillaError(f"{command[0]} not found: install flotilla[federated] (flwr)") from None
    finally:
        handle.close()
    return Daemon(name, process, log)


def wait_for_port(host: str, port: int, daemon: Daemon, timeout: float = 60.0) -> None:
    """Block until ``host:port`` accepts connections; fail early if ``daemon`` dies."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not daemon.alive():
            raise BackendError(
                f"{daemon.name} exited with code {daemon.process.returncode}:\n{daemon.tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise BackendError(
        f"{daemon.name} did not listen on {host}:{port} within {timeout:.0f} s:\n{daemon.tail()}"
    )


# ---------------------------------------------------------------------------------------------- server


@dataclass
class ServerFiles:
    """The TLS material and enrolled site keys of a SuperLink."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    enrolled: list[Path]


def server_files(fed: FederationSpec) -> ServerFiles | None:
    """Certificates and site keys from ``server.keys`` (None with ``server.insecure``)."""
    if fed.server.insecure:
        return None
    keys = Path(fed.server.keys)
    files = ServerFiles(
        keys / "ca.crt", keys / "server.crt", keys / "server.key", [Path(p) for p in fed.server.enroll]
    )
    if not files.enrolled:
        files.enrolled = sorted((keys / "sites").glob("*.pub"))
    missing = [
        str(p)
        for p in (files.ca_cert, files.server_cert, files.server_key, *files.enrolled)
        if not p.is_file()
    ]
    if missing:
        raise FlotillaError(
            f"server.keys: missing {', '.join(missing)}; create trial keys with "
            f"`flotilla fed keys {keys} --site <name> ...` or point server.keys at your own"
        )
    if not files.enrolled:
        raise FlotillaError(
            f"server.keys: no site public keys in {keys / 'sites'} and server.enroll is empty"
        )
    return files


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """The Flower CLI connection ``flotilla`` in ``$FLWR_HOME/config.toml``."""
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{address}"',
    ]
    lines.append(f'root-certificates = "{ca_cert}"' if ca_cert else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_app(folder: Path) -> Path:
    """A minimal Flower app folder: its FAB carries no code or data, only which components to run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    (folder / "README.md").write_text(
        "Flotilla federated LoRA fine-tuning (components from the installed package).\n"
    )
    return folder


def start_superlink(fed: FederationSpec, work_dir: Path, files: ServerFiles | None) -> Daemon:
    """``flower-superlink`` on ``server.host:server.port``; returns once it accepts connections."""
    home = work_dir / "flwr-home"
    env = flower_env(home)
    command = ["flower-superlink", "--host", fed.server.host, "--port", str(fed.server.port)]
    command += ["--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    command += ["--database", str(work_dir / "superlink.db")]  # enrolled nodes survive a restart
    if files is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(files.ca_cert), "--ssl-certfile", str(files.server_cert)]
        command += ["--ssl-keyfile", str(files.server_key), "--enable-supernode-auth"]
    daemon = start_daemon("flower-superlink", command, env, work_dir / "superlink.log")
    try:
        wait_for_port(fed.server.host, fed.server.port, daemon)
        write_connection(home, f"{fed.server.host}:{fed.server.port}", files.ca_cert if files else None)
        if files is not None:
            sync_enrollments(work_dir, files.enrolled, env)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def flwr_cli(
    args: list[str], env: dict[str, str], timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI against the ``flotilla`` connection."""
    return subprocess.run(
        ["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def enroll(public_key: Path, env: dict[str, str]) -> int | None:
    """Register a site's public key with the SuperLink (only enrolled SuperNodes may connect);
    the new node id, or None when the key was enrolled before (the database keeps it)."""
    command = ["supernode", "register", str(public_key), CONNECTION, "--name", public_key.stem]
    result = flwr_cli([*command, "--format", "json"], env)
    printed = result.stdout + result.stderr
    if "{" in result.stdout:
        reply = json.loads(result.stdout[result.stdout.index("{") :])
        if reply.get("node-id"):
            return int(reply["node-id"])
    if "already" not in printed.lower():
        raise BackendError(f"cannot enroll {public_key}: {printed.strip()[-600:]}")
    return None


def sync_enrollments(work_dir: Path, keys: list[Path], env: dict[str, str]) -> None:
    """Make the SuperLink's enrollments those of ``keys``: unregister a node whose site was revoked
    or whose key was replaced (``fed keys --force``) or dropped, then enroll every current key."""
    current = {key.stem: key_fingerprint(key) for key in keys}
    revoked = revoked_sites(work_dir)
    for node, enrollment in enrollments(work_dir).items():
        if enrollment.site in revoked or current.get(enrollment.site) != enrollment.key:
            if unregister(node, env) is False:
                raise BackendError(f"cannot unregister {enrollment.site} (node {node}) from the SuperLink")
            forget_enrollment(work_dir, node)
    for key in keys:
        if key.stem not in revoked and (node := enroll(key, env)):
            remember_enrollment(work_dir, node, key.stem, current[key.stem])


def unregister(node: int, env: dict[str, str]) -> bool | None:
    """Remove ``node``'s enrollment from the SuperLink: True when done, None when the SuperLink
    does not know the node, False when it could not be asked (no SuperLink running)."""
    result = flwr_cli(["supernode", "unregister", str(node), CONNECTION, "--format", "json"], env)
    if result.returncode == 0:
        return True
    printed = (result.stdout + result.stderr).lower()
    return None if any(word in printed for word in ("not found", "does not exist", "unknown")) else False


def submit_run(app_dir: Path, spec_file: Path, work_dir: Path, env: dict[str, str]) -> int:
    """``flwr run`` the Flotilla app with the federation spec; returns the run id."""
    config = f"federation='{spec_file}' work-dir='{work_dir}'"
    result = flwr_cli(["run", str(app_dir), CONNECTION, "--run-config", config, "--format", "json"], env)
    try:
        return int(json.loads(result.stdout[result.stdout.index("{") :])["run-id"])
    except (ValueError, KeyError, TypeError):
        raise BackendError(f"flwr run failed: {(result.stdout + result.stderr).strip()[-800:]}") from None


def run_status(run_id: int, env: dict[str, str]) -> tuple[str, str]:
    """``(status, details)`` of a run, e.g. ``("finished:completed", "")``."""
    result = flwr_cli(["list", CONNECTION, "--run-id", str(run_id), "--format", "json"], env, timeout=60)
    try:
        run = json.loads(result.stdout[result.stdout.index("{") :])["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown", (result.stdout + result.stderr).strip()[-300:]


def follow_run(
    run_id: int, superlink: Daemon, env: dict[str, str], on_tick: Callable[[], None], poll: float = 3.0
) -> tuple[str, str]:
    """Wait until the run finishes (calling ``on_tick`` between polls); returns its final status."""
    while True:
        superlink.remember_children()
        if not superlink.alive():
            raise BackendError(f"the SuperLink exited during the run:\n{superlink.tail()}")
        status, details = run_status(run_id, env)
        on_tick()
        if status.startswith("finished"):
            return status, details
        time.sleep(poll)


def server_log(run_id: int, env: dict[str, str]) -> str:
    """The ServerApp's log of a run (``flwr log --show``)."""
    result = flwr_cli(["log", str(run_id), CONNECTION, "--show"], env, timeout=60)
    return result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ site


#: The site's policy as the ClientApp reads it, in the site's work dir.
POLICY_FILE = "policy.json"


def supernode_command(site: SiteSpec, runtime_port: int) -> list[str]:
    """``flower-supernode`` for a site: its CA, its node key, and the node config naming its job
    and its policy."""
    policy = Path(site.work_dir) / POLICY_FILE
    node_config = f'site="{site.site}" job="{site.job}" work-dir="{site.work_dir}" policy="{policy}"'
    command = ["flower-supernode", "--superlink", site.superlink, "--node-config", node_config]
    command += ["--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(runtime_port)]
    if site.insecure:
        return [*command, "--insecure"]
    return [
        *command,
        "--root-certificates",
        str(site.ca_cert),
        "--auth-supernode-private-key",
        str(site.private_key),
    ]


def refused(node: Daemon) -> bool:
    """True when the SuperNode stopped because the SuperLink would not let it in (the shell only
    sees ``305 % 256``, so the log is checked)."""
    return f"Exit Code: {SUPERNODE_REFUSED}" in node.tail(60)


def start_supernode(site: SiteSpec, runtime_port: int) -> Daemon:
    """Start the site's SuperNode; it connects (and reconnects) to the SuperLink on its own."""
    for path in (site.job, site.ca_cert, site.private_key):
        if path and not Path(path).is_file():
            raise FlotillaError(f"site {site.site}: {path} does not exist")
    work_dir = Path(site.work_dir)
    write_json_atomic(work_dir / POLICY_FILE, site.policy.model_dump(mode="json"))
    env = flower_env(work_dir / "flwr-home")
    return start_daemon(
        f"flower-supernode ({site.site})",
        supernode_command(site, runtime_port),
        env,
        work_dir / "supernode.log",
    )
