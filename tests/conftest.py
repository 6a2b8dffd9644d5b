"""Shared fixtures: a quiet offline environment, a tiny Llama-shaped model, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from launcher.processes import process_tree
from launcher.rundir import read_jsonl

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "configs" / "data"

pytest_plugins = ["tests.slurm_cluster", "tests.mlflow_server"]

QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
}
os.environ.update({k: v for k, v in QUIET_ENV.items() if k != "OMP_NUM_THREADS"})


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's real tokenizer, saved as a folder."""
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """Write a spec mapping as YAML into the test's folder and return its path."""

    def write(spec: dict[str, Any], name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return path

    return write


def flotilla(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run the real ``flotilla`` CLI in a subprocess and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd or REPO,
        env={**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_flotilla(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
    """Start the real ``flotilla`` CLI in the background (output discarded unless ``stdout=`` says)."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=REPO,
        env={**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO), **(env or {})},
        text=True,
        **popen,
    )


def start_training(spec: Path, runs: Path, **popen: Any) -> tuple[subprocess.Popen[str], list[int]]:
    """``flotilla run spec`` in the background, once it trains (metrics.jsonl under ``runs``, then a
    second more): the CLI process and every process of its job."""
    process = start_flotilla("run", str(spec), **popen)
    wait_for(lambda: list(runs.glob("*/*/metrics.jsonl")), 300, "training to start")
    time.sleep(1.0)
    return process, process_tree(process.pid)


def processes_left(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie awaiting its parent's wait does not count)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            continue
    return left


def rank_pids(job: list[int]) -> dict[str, int]:
    """RANK -> PID of every training process (``python -m launcher.train``) among ``job``."""
    return {
        psutil.Process(pid).environ().get("RANK", "0"): pid
        for pid in job
        if "launcher.train" in psutil.Process(pid).cmdline()
    }


def tiny_job(model_dir: Path, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A small causal-LM job on the shipped instruction data, for fast end-to-end tests."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "seed": 7,
        "model": {"path": str(model_dir)},
        "data": {
            "train": str(DATA / "instructions.jsonl"),
            "validation": str(DATA / "instructions_val.jsonl"),
            "max_length": 64,
            "max_train_rows": 96,
            "max_validation_rows": 16,
        },
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "learning_rate": 1e-3,
            "micro_batch_size": 4,
            "max_steps": 8,
            "logging_steps": 1,
            "warmup_ratio": 0.1,
        },
        "eval": {"at_start": True},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def tiny_classifier_job(output_dir: Path, max_steps: int, **sections: Any) -> dict[str, Any]:
    """A small sentiment job on the bundled MiniLM (LoRA on query/value), named ``cls``."""
    spec: dict[str, Any] = {
        "name": "cls",
        "seed": 7,
        "model": {"path": "minilm-l6", "task": "sequence_classification"},
        "data": {
            "train": str(DATA / "sentiment.jsonl"),
            "validation": str(DATA / "sentiment_val.jsonl"),
            "format": "classification",
            "max_length": 64,
            "max_train_rows": 48,
            "max_validation_rows": 16,
        },
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
        "train": {"learning_rate": 5e-3, "micro_batch_size": 16, "max_steps": max_steps, "logging_steps": 1},
        **sections,
        "output": {"dir": str(output_dir)},
    }
    return spec


#: The smallest valid federation spec (3 sites, tiny model), for tests of the spec rules.
UNIT_FEDERATION: dict[str, Any] = {
    "name": "unit",
    "model": {"path": "tiny"},
    "peft": {"method": "lora", "r": 4, "alpha": 8},
    "rounds": 2,
    "min_sites": 3,
    "sites": {"a": "a.yaml", "b": "b.yaml", "c": "c.yaml"},
}


@pytest.fixture
def constant_rate_site(tiny_llama: Path, tmp_path: Path, write_spec: Callable[..., Path]) -> tuple[Path, Any]:
    """A federated site's job spec (tiny model, rate 2e-3 constant, no warm-up, LoRA r 4) and the
    initial global adapter's arrays."""
    from federated.adapters import GlobalModel
    from launcher.spec import ModelSpec, PeftSpec

    job = write_spec(
        tiny_job(
            tiny_llama,
            tmp_path,
            train={"learning_rate": 2e-3, "warmup_ratio": 0.0, "scheduler": "constant"},
            eval={"at_start": False},
        ),
        "site.yaml",
    )
    peft = PeftSpec(method="lora", r=4, alpha=8, dropout=0.0)
    return job, GlobalModel.build(ModelSpec(path=str(tiny_llama)), peft, None, seed=0).arrays()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Any]:
    """A Ray head with the dashboard (Jobs and state APIs) on 127.0.0.1, stopped by PID after the module."""
    from launcher.backends.ray.cluster import RayHead

    head = RayHead.start(num_cpus=2, dashboard=True)
    try:
        yield head
    finally:
        head.stop()


def assert_adapter_reloads_equal(base: Path, run_dir: Path) -> dict[str, Any]:
    """The run's saved adapter is non-empty, PeftModel reloads it onto ``base`` with every tensor
    equal, and LoRA B moved away from its zero init; returns the saved tensors."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "adapter")
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    live = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and len(live) == len(saved)
    for key, tensor in saved.items():
        assert tensor.numel() > 0
        assert torch.equal(live[key.replace(".weight", ".default.weight")].detach(), tensor), key
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
    return saved


def only_run_dir(root: Path, name: str = "tiny") -> Path:
    """The one run directory of job ``name`` under the output folder ``root``."""
    runs = sorted(p for p in (root / name).iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def loss_log(run_dir: Path) -> list[tuple[int, float]]:
    """Every training loss of metrics.jsonl in order, as (step, loss) (a step again after a restart)."""
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step (a step logged again after a resume keeps its last value)."""
    return dict(loss_log(run_dir))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something true (returned), failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the running task's identity; give this test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def unavailable(reason: str) -> None:
    """Skip a test whose engine is missing here; in CI (``CI=true``) fail instead, so that a missing
    install step cannot pass as skipped tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: required)", pytrace=False)
    pytest.skip(reason)


def import_or_unavailable(module: str) -> Any:
    """``pytest.importorskip`` that fails in CI."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        unavailable(f"{module} is not importable: {exc}")
