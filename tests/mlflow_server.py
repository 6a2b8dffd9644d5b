"""A real MLflow tracking server for the tracker tests: ``mlflow server`` on 127.0.0.1 with a SQLite
backend store and proxied artefacts, from the venv ``tests/install_mlflow_server.sh`` builds; started
once per session and stopped by PID (with the workers it started)."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.backends.commands import free_port
from launcher.processes import process_tree, stop_processes

REPO = Path(__file__).resolve().parent.parent
MLFLOW_VENV = Path(os.environ.get("FLOTILLA_MLFLOW_VENV", REPO / ".venv-mlflow"))


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI of a running ``mlflow server`` (http://127.0.0.1:<port>)."""
    from tests.conftest import unavailable, wait_for

    binary = MLFLOW_VENV / "bin" / "mlflow"
    if not binary.is_file():
        unavailable(f"no MLflow server at {binary}: run bash tests/install_mlflow_server.sh")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(binary),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))},
            # No job runner: tracking needs none, and its queue lives in a /dev/shm folder that
            # the server never removes (one per server started).
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
    )
    try:
        wait_for(lambda: _healthy(uri) or server.poll() is not None, 300, "mlflow server to start")
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        yield uri
    finally:
        stop_processes(process_tree(server.pid), timeout=5)
        server.wait(timeout=15)
        log.close()
