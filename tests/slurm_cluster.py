"""Pytest plugin: a throwaway 2-node Slurm cluster on loopback (session-scoped).

Use it from the root ``conftest.py``::

    pytest_plugins = ["tests.slurm_cluster"]

and request the ``slurm_cluster`` fixture. The fixture runs
``slurm/dev-cluster/install.sh`` (installs Debian's Slurm and munge if missing),
``up.sh`` into a fresh directory under ``/tmp`` and, at the end of the session,
``down.sh --purge``. It needs root (the daemons run as root in private mount
namespaces); without root the tests using it are skipped.

Set ``FLOTILLA_SLURM_KEEP=1`` to keep the state directory (logs, configs) after
the session. Ports come from ``up.sh``'s ``FLOTILLA_SLURM_*`` variables.

Every Slurm client call must carry ``SLURM_CONF`` (``cluster.env`` does):
without it the clients fall back to "configless" mode and query DNS.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import unavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
DEV_CLUSTER = REPO_ROOT / "slurm" / "dev-cluster"
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
_EXPORT_RE = re.compile(r"^export ([A-Za-z_][A-Za-z0-9_]*)='([^']*)'$")
_FIELD_RE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(\S*)")


class SlurmCommandError(subprocess.CalledProcessError):
    """A Slurm CLI call failed; the message includes its stdout and stderr."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n--- stdout ---\n{self.stdout or ''}\n--- stderr ---\n{self.stderr or ''}"
        )


@dataclass
class SlurmCluster:
    """Handle on a running dev cluster.

    Attributes:
        state_dir: the cluster's state directory (``etc/``, ``log/``, ``pids/``...).
        env: environment for subprocesses that talk to the cluster: the current
            environment without inherited ``SLURM_*`` variables, plus what
            ``STATE_DIR/env.sh`` exports (``SLURM_CONF`` above all).
    """

    state_dir: Path
    env: dict[str, str]

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm CLI command (``["sbatch", ...]``) against this cluster.

        Output is captured as text. With ``check`` a non-zero exit raises
        :class:`SlurmCommandError`, whose message shows stdout and stderr.
        """
        proc = subprocess.run(
            list(args),
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise SlurmCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """Return ``scontrol show job -o`` for one job as ``{field: value}``.

        Values with spaces (``Command``, ``Comment``...) are cut at the first
        space; state, reason, restarts and exit code are exact.
        """
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(_FIELD_RE.findall(out.strip()))

    def job_state(self, job_id: str | int) -> str:
        """Return the job's ``JobState`` (``PENDING``, ``RUNNING``, ``COMPLETED``...)."""
        return self.job_info(job_id).get("JobState", "")

    def wait_for_state(
        self,
        job_id: str | int,
        states: str | Sequence[str],
        *,
        timeout: float = 30.0,
        interval: float = 0.1,
    ) -> dict[str, str]:
        """Poll until the job's state is one of ``states``; return its job info.

        Raises ``AssertionError`` if the job reaches another terminal state, and
        ``TimeoutError`` after ``timeout`` seconds; both include the job record.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in wanted:
                return info
            if state in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended {state}, wanted {sorted(wanted)}: {info}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout}s: {info}")
            time.sleep(interval)

    def release_requeued(self, job_id: str | int, *, timeout: float = 30.0) -> None:
        """Let a requeued job start again now instead of in about 121 s.

        A requeued (or preempted) job returns to ``PENDING`` with
        ``Reason=BeginTime`` and an eligible time about two minutes away. This
        waits until the job is ``PENDING`` and then runs
        ``scontrol update JobId=<id> StartTime=now``.

        The update is held back until the wall clock has entered the next whole
        second: slurmd revokes the old run's credential with a timestamp in whole
        seconds and refuses a launch credential created in that same second
        ("Killing non-startable batch JobId=N: Job credential revoked", the job
        then ends FAILED). The built-in 121 s delay exists for that reason; one
        second is enough here, because the revocation happens no later than the
        job shows ``PENDING``.
        """
        self.wait_for_state(job_id, "PENDING", timeout=timeout, interval=0.05)
        now = time.time()
        time.sleep(math.floor(now) + 1.05 - now)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])


def _client_env(state_dir: Path) -> dict[str, str]:
    """Build the client environment from ``STATE_DIR/env.sh``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for line in (state_dir / "env.sh").read_text().splitlines():
        match = _EXPORT_RE.match(line.strip())
        if match:
            env[match.group(1)] = match.group(2)
    if "SLURM_CONF" not in env:
        raise RuntimeError(f"{state_dir / 'env.sh'} does not export SLURM_CONF")
    return env


def _missing_binaries() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in REQUIRED_BINARIES if shutil.which(name, path=path) is None]


def _script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEV_CLUSTER / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start a 2-node Slurm cluster (node1, node2; partitions debug*, low, high).

    Installs Slurm and munge first if they are missing. Skips when not root:
    installing needs root, and so do the cluster's mount namespaces.
    """
    if os.geteuid() != 0:
        missing = _missing_binaries()
        if missing:
            unavailable(
                f"Slurm dev cluster: {', '.join(missing)} not installed and not root; "
                "run `sudo bash slurm/dev-cluster/install.sh` (or run the tests as root)"
            )
        unavailable("Slurm dev cluster needs root (daemons run as root in private mount namespaces)")

    install = _script("install.sh", timeout=600)
    if install.returncode != 0:
        pytest.fail(f"slurm/dev-cluster/install.sh failed:\n{_output(install)}", pytrace=False)

    state_dir = Path(tempfile.mkdtemp(prefix="flotilla-slurm-", dir="/tmp"))
    up = _script("up.sh", str(state_dir), timeout=120)
    if up.returncode != 0:
        shutil.rmtree(state_dir, ignore_errors=True)
        pytest.fail(f"slurm/dev-cluster/up.sh failed:\n{_output(up)}", pytrace=False)

    try:
        yield SlurmCluster(state_dir=state_dir, env=_client_env(state_dir))
    finally:
        keep = os.environ.get("FLOTILLA_SLURM_KEEP", "") not in ("", "0")
        args = [str(state_dir)] if keep else [str(state_dir), "--purge"]
        down = _script("down.sh", *args, timeout=120)
        if down.returncode != 0:
            pytest.fail(f"slurm/dev-cluster/down.sh failed:\n{_output(down)}", pytrace=False)
