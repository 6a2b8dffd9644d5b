"""The DeepSpeed config, its overrides and the compatibility matrix; launch commands; the preflight.

Fast: no training. The end-to-end runs are in tests/test_deepspeed.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from launcher.backends.commands import (
    free_port,
    launcher_command,
    read_hostfile,
    render_shell,
    write_hostfile,
)
from launcher.backends.deepspeed import BACKEND
from launcher.errors import FlotillaError, SpecError
from launcher.plan import build_plan, validate_job
from launcher.plan.deepspeed import override_problems
from tests.conftest import QUIET_ENV, REPO, flotilla

BASE: dict[str, Any] = {
    "name": "ds",
    "model": {"path": "some-model"},
    "data": {"train": "train.jsonl"},
    "train": {"micro_batch_size": 2, "global_batch_size": 16, "max_grad_norm": 0.5},
    "resources": {"backend": "deepspeed", "processes_per_node": 2, "precision": "bf16", "zero": {"stage": 3}},
}


def spec_with(**resources: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    spec["resources"].update(resources)
    return spec


def problems_of(spec: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        validate_job(spec, "job.yaml", [])
    return str(caught.value)


def plan_of(spec: dict[str, Any], run_dir: Path = Path("/runs/ds/1")) -> Any:
    return build_plan(validate_job(spec, "job.yaml", []), run_dir, cuda_available=False)


def leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for child in value.values() for leaf in leaves(child)]
    return [value]


def test_config_is_derived_from_the_spec_with_no_auto_left() -> None:
    spec = spec_with(zero={"stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"})
    config = plan_of(spec).deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4  # 16 / (2 × 2 ranks)
    assert config["train_batch_size"] == 16
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert "optimizer" not in config and "scheduler" not in config  # the Trainer's
    assert "auto" not in leaves(config)
    assert override_problems({"wall_clock_breakdown": False}, config) == []  # DeepSpeed accepts it


def test_overrides_are_merged_and_checked_against_deepspeeds_schema() -> None:
    merged = plan_of(spec_with(deepspeed_overrides={"zero_optimization": {"overlap_comm": True}}))
    assert merged.deepspeed_config["zero_optimization"]["overlap_comm"] is True
    assert merged.deepspeed_config["zero_optimization"]["stage"] == 3

    text = problems_of(
        spec_with(
            deepspeed_overrides={
                "gradient_clipping": 2.0,
                "train_micro_batch_size_per_gpu": "auto",
                "optimizer": {"type": "AdamW"},
                "zero_optimization": {"stage": 2},
            }
        )
    )
    assert "resources.deepspeed_overrides.gradient_clipping: 2.0 contradicts the derived value 0.5" in text
    assert "(from train.max_grad_norm)" in text
    assert "train_micro_batch_size_per_gpu: 'auto' is not allowed" in text
    assert "deepspeed_overrides.optimizer: set by the Trainer" in text
    assert "zero_optimization.stage: 2 contradicts the derived value 3 (from resources.zero.stage)" in text

    text = problems_of(spec_with(deepspeed_overrides={"zero_optimization": {"overlap_com": True}}))
    assert "zero_optimization.overlap_com: DeepSpeed has no such key; did you mean 'overlap_comm'?" in text
    text = problems_of(spec_with(deepspeed_overrides={"bogus": 1}))
    assert "deepspeed_overrides.bogus: DeepSpeed does not read this key" in text
    text = problems_of(spec_with(deepspeed_overrides={"zero_optimization": {"reduce_bucket_size": -1}}))
    assert "reduce_bucket_size: -1 is not allowed by DeepSpeed" in text


@pytest.mark.parametrize(
    ("resources", "sections", "expected"),
    [
        ({"zero": {"stage": 0, "offload_optimizer": "cpu"}}, {}, "optimizer offload needs stage >= 1"),
        ({"zero": {"stage": 2, "offload_params": "cpu"}}, {}, "parameter offload needs stage 3"),
        ({"precision": "fp16"}, {}, "fp16 needs a GPU"),
        ({"backend": "local"}, {}, "ZeRO needs DeepSpeed"),
        ({"zero": None, "deepspeed_overrides": {"wall_clock_breakdown": True}}, {}, "resources.zero set"),
        ({}, {"train": {"micro_batch_size": 2, "global_batch_size": 6}}, "not divisible by"),
        (
            {},
            {"model": {"path": "m", "unfreeze_schedule": [{"step": 2, "patterns": ["lm_head"]}]}},
            "gradual unfreezing is not supported under ZeRO",
        ),
    ],
)
def test_invalid_combinations_are_refused(
    resources: dict[str, Any], sections: dict[str, Any], expected: str
) -> None:
    spec = spec_with(**resources)
    spec.update(sections)
    assert expected in problems_of(spec)


def test_cli_reports_every_problem_with_line_numbers_and_no_traceback(tmp_path: Path) -> None:
    spec = spec_with(zero={"stage": 2, "offload_params": "cpu"}, precision="fp16")
    spec["model"]["unfreeze_schedule"] = [{"step": 1, "patterns": ["lm_head"]}]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = flotilla("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())
    assert "3 problems" in text
    for needle in ("resources.zero.offload_params", "resources.precision", "model.unfreeze_schedule"):
        assert needle in text
    assert "line " in text


def test_launcher_commands_for_one_node_a_hostfile_and_slurm(tmp_path: Path) -> None:
    plan = plan_of(spec_with())
    local = launcher_command(plan, master_port=29555)
    assert local[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert {"--num_nodes=1", "--num_gpus=2", "--master_addr=127.0.0.1", "--master_port=29555"} <= set(local)
    assert local[-4:] == ["--no_local_rank", "--module", "launcher.train", "/runs/ds/1"]

    two = plan_of(spec_with(nodes=2, processes_per_node=4, zero={"stage": 2}))
    hosts = write_hostfile(tmp_path / "hosts", ["gpu-a", "gpu-b"], 4)
    assert read_hostfile(hosts) == [("gpu-a", 4), ("gpu-b", 4)]
    pdsh = launcher_command(two, rank_source="hostfile", master_addr="gpu-a", master_port=1, hostfile=hosts)
    assert {f"--hostfile={hosts}", "--num_nodes=2", "--num_gpus=4", "--launcher=pdsh"} <= set(pdsh)

    slurm = launcher_command(
        two, rank_source="slurm", master_addr="$MASTER_ADDR", master_port="${MASTER_PORT}", hostfile=hosts
    )
    line = render_shell(slurm)
    assert '--node_rank="$SLURM_NODEID"' in line and '--master_addr="$MASTER_ADDR"' in line
    assert '--master_port="${MASTER_PORT}"' in line and "--no_ssh" in line

    (tmp_path / "bad").write_text("gpu-a 4\n")
    with pytest.raises(FlotillaError, match="expected 'hostname slots=N'"):
        read_hostfile(tmp_path / "bad")


def test_several_nodes_need_a_hostfile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOTILLA_HOSTFILE", raising=False)
    plan = plan_of(spec_with(nodes=2))
    with pytest.raises(FlotillaError, match="needs a hostfile: set FLOTILLA_HOSTFILE"):
        BACKEND._start(plan, 1234)


PREFLIGHT = """
import sys
from launcher.train.preflight import PreflightError, preflight
try:
    print(preflight("cpu", 1, 3))
except PreflightError as exc:
    print(exc)
    sys.exit(3)
"""


def run_preflight(rank: int, port: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **QUIET_ENV,
        "PYTHONPATH": str(REPO),
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    return subprocess.run(
        [sys.executable, "-c", PREFLIGHT], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_preflight_names_the_rank_that_did_not_arrive() -> None:
    result = run_preflight(0, free_port())
    assert result.returncode == 3, result.stderr[-2000:]
    message = " ".join(result.stdout.split())
    assert "1 of 2 ranks did not reach the rendezvous" in message
    assert "rank 1 (node 1)" in message and "arrived: 0 (" in message


def test_preflight_names_the_unreachable_master() -> None:
    port = free_port()
    result = run_preflight(1, port)
    assert result.returncode == 3, result.stderr[-2000:]
    message = " ".join(result.stdout.split())
    assert "rank 1 on" in message and f"could not reach the rendezvous at 127.0.0.1:{port}" in message


def test_the_forwarded_environment_is_owner_only_and_keeps_secrets_off_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.backends.deepspeed import _write_forwarded_env

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("HF_HOME", "/data/hf")
    monkeypatch.setenv("NCCL_API_KEY", "k")
    env_file = _write_forwarded_env(tmp_path)
    assert env_file.stat().st_mode & 0o777 == 0o600
    written = env_file.read_text()
    assert "HF_HOME=/data/hf" in written
    assert "hf_secret_value" not in written and "NCCL_API_KEY" not in written
    monkeypatch.setenv("FLOTILLA_FORWARD_SECRETS", "HF_TOKEN")
    assert "HF_TOKEN=hf_secret_value" in _write_forwarded_env(tmp_path).read_text()  # listed: forwarded


def test_a_stale_job_record_never_reports_or_signals_the_process_that_reuses_its_pid(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])  # stands for an unrelated process that got the PID
    try:
        (tmp_path / "plan.json").write_text("{}")
        (tmp_path / "metrics.jsonl").write_text("")
        record = {"backend": "deepspeed", "job_id": str(bystander.pid), "started": "1000.0"}
        (tmp_path / "job.json").write_text(json.dumps(record))
        assert flotilla("status", str(tmp_path)).stdout.strip() == "FAILED"
        cancel = flotilla("cancel", str(tmp_path))
        assert cancel.returncode == 2 and "is not running" in cancel.stderr, cancel.stderr
        assert bystander.poll() is None, "the unrelated process was signalled"
        record["started"] = str(psutil.Process(bystander.pid).create_time())  # the real launcher's record
        (tmp_path / "job.json").write_text(json.dumps(record))
        assert flotilla("status", str(tmp_path)).stdout.strip() == "RUNNING"
    finally:
        bystander.kill()
        bystander.wait()
