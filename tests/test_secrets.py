"""Secrets in the environment a spec sets never reach what Flotilla writes or prints (README, "Secrets").

The attack: a user puts a token in ``ray.runtime_env.env_vars`` or exports it in ``slurm.setup``, and
a colleague later reads the run dir, a pasted `flotilla plan` or a `--dry-run`. Each must show
``<redacted>``, and a run resumed from its run dir takes the value from its own environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import FlotillaError
from launcher.plan import prepare_run
from launcher.redact import REDACTED, restore_secrets
from tests.conftest import flotilla, tiny_job

TOKEN, API_KEY = "hf_s3cr3tvalue", "wk_0therS3cret"


@pytest.fixture
def secret_spec(tiny_llama: Path, tmp_path: Path, write_spec) -> Path:
    spec = tiny_job(
        tiny_llama,
        tmp_path,
        ray={"runtime_env": {"env_vars": {"HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}}},
        slurm={"setup": [f"export WANDB_API_KEY={API_KEY}", "export HF_TOKEN=$HF_TOKEN"]},
    )
    return write_spec(spec)


def assert_no_secret(text: str) -> None:
    assert TOKEN not in text and API_KEY not in text, text
    assert REDACTED in text, text


def test_plan_and_dry_runs_print_no_secret(secret_spec: Path) -> None:
    plan = flotilla("plan", str(secret_spec))
    assert plan.returncode == 0, plan.stderr
    assert_no_secret(plan.stdout)
    assert '"OMP_NUM_THREADS": "1"' in plan.stdout  # only secrets are redacted
    printed = {}
    for backend in ("slurm", "ray"):
        dry = flotilla("submit", str(secret_spec), "--backend", backend, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert_no_secret(dry.stdout)
        printed[backend] = dry.stdout
    assert "export HF_TOKEN=$HF_TOKEN" in printed["slurm"]  # a reference holds no secret


def test_the_run_dir_holds_no_secret_and_a_resume_takes_it_from_the_environment(
    secret_spec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = prepare_run(secret_spec, [])
    assert prepared.spec.ray is not None
    assert prepared.spec.ray.runtime_env["env_vars"]["HF_TOKEN"] == TOKEN  # this run still has it
    for name in ("plan.json", "spec.yaml"):
        assert_no_secret((prepared.run_dir / name).read_text())
    assert TOKEN in secret_spec.read_text()  # the user's own file is left as it was

    env_vars = {"HF_TOKEN": REDACTED, "OMP_NUM_THREADS": "1"}
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(
        FlotillaError, match=r"ray.runtime_env.env_vars: HF_TOKEN is redacted.*export HF_TOKEN"
    ):
        restore_secrets(env_vars, "ray.runtime_env.env_vars")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert restore_secrets(env_vars, "ray.runtime_env.env_vars") == {
        "HF_TOKEN": TOKEN,
        "OMP_NUM_THREADS": "1",
    }
