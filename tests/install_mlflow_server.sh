#!/usr/bin/env bash
# The MLflow tracking server the tracker tests start (mlflow server, SQLite store, 127.0.0.1 only).
# It lives in its own venv: the full mlflow package pins pyarrow<26, Flotilla's data step pyarrow 26;
# Flotilla itself only needs the client (mlflow-skinny, the `tracking` extra), as a real deployment
# talks to a tracking server installed elsewhere.
# Usage: bash tests/install_mlflow_server.sh [venv dir]   (default .venv-mlflow; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${FLOTILLA_MLFLOW_VENV:-.venv-mlflow}}
if [ -x "$VENV/bin/mlflow" ] && "$VENV/bin/python" -c 'import mlflow, sys; sys.exit(mlflow.__version__ != "3.17.2")'; then
    exit 0
fi
python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check mlflow==3.17.2
