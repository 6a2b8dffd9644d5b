"""DeepSpeed end to end: 2 CPU ranks on gloo through the CLI (tiny Llama; one real SmolLM2 run).

ZeRO-2 and ZeRO-3 with LoRA learn and save verified adapters that reload equal; ZeRO-3 with CPU
offload; gradient checkpointing gives the same losses; SIGKILL then --resume continues exactly from
the renamed (staged, then published) DeepSpeed checkpoint; the per-node (Slurm) launch path works
with two "nodes" on loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from launcher.backends.commands import launcher_command, write_hostfile
from launcher.plan.plan import Plan
from tests.conftest import (
    QUIET_ENV,
    REPO,
    assert_adapter_reloads_equal,
    flotilla,
    losses,
    only_run_dir,
    start_flotilla,
    tiny_job,
)

ZERO3 = {"backend": "deepspeed", "processes_per_node": 2, "zero": {"stage": 3}}
RANK = 4  # tiny_job's LoRA rank
STEPS = {"max_steps": 8, "save_steps": 3, "logging_steps": 1}


def shm_segments() -> set[Path]:
    """This user's DeepSpeed shared-memory allreduce segments in /dev/shm."""
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))


def run_job(tmp_path: Path, write_spec: Any, model_dir: Path, name: str, **sections: Any) -> Path:
    """Run a tiny job through ``flotilla run`` and return its run directory; the run leaves none of
    DeepSpeed's 64 MiB shared-memory allreduce segments behind in /dev/shm."""
    spec = write_spec(tiny_job(model_dir, tmp_path / name, **sections), f"{name}.yaml")
    before = shm_segments()
    result = flotilla("run", str(spec))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "preflight: 2 ranks" in result.stderr
    assert not shm_segments() - before
    return only_run_dir(tmp_path / name / "runs")


def assert_learned_and_adapter_reloads(run_dir: Path, base: Path) -> None:
    """Loss went down; the adapter is non-empty, full-shaped, and PeftModel reloads it equal."""
    from transformers import AutoModelForCausalLM

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    logged = losses(run_dir)
    assert logged[max(logged)] < logged[min(logged)]
    saved = assert_adapter_reloads_equal(base, run_dir)
    reference = AutoModelForCausalLM.from_pretrained(base)
    for key, tensor in saved.items():
        layer = key.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
        linear = reference.get_submodule(layer)
        expected = (RANK, linear.in_features) if "lora_A" in key else (linear.out_features, RANK)
        assert tuple(tensor.shape) == expected, key


@pytest.fixture(scope="module")
def zero3_reference(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ZeRO-3 LoRA run (checkpoints every 3 steps): the reference several tests compare with."""
    tmp = tmp_path_factory.mktemp("zero3")
    spec_file = tmp / "ref.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(tiny_job(tiny_llama, tmp, resources=ZERO3, train=STEPS)))
    result = flotilla("run", str(spec_file))
    assert result.returncode == 0, result.stderr[-4000:]
    return only_run_dir(tmp / "runs")


def test_zero3_lora_learns_and_saves_a_gathered_verified_adapter(
    zero3_reference: Path, tiny_llama: Path
) -> None:
    assert_learned_and_adapter_reloads(zero3_reference, tiny_llama)
    plan = json.loads((zero3_reference / "plan.json").read_text())
    assert plan["deepspeed_config"]["zero_optimization"]["stage"] == 3
    checkpoint = zero3_reference / "checkpoints" / "checkpoint-6"
    assert (checkpoint / "latest").read_text().strip() == "global_step6"
    assert len(list((checkpoint / "global_step6").glob("*optim_states.pt"))) == 2  # one shard per rank


def test_an_adapter_trained_under_zero3_exports_merged_and_verified(
    zero3_reference: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    """The gathered ZeRO-3 adapter merges into the base: logits equal base + adapter, not the base."""
    from tests.test_export import assert_export_matches_the_adapter

    assert_export_matches_the_adapter(tiny_llama, zero3_reference, tmp_path / "merged")


def test_zero2_lora_learns_and_saves_a_verified_adapter(tiny_llama: Path, tmp_path: Path, write_spec) -> None:
    zero2 = {**ZERO3, "zero": {"stage": 2}}
    run_dir = run_job(tmp_path, write_spec, tiny_llama, "z2", resources=zero2, train=STEPS)
    assert_learned_and_adapter_reloads(run_dir, tiny_llama)


def test_gradient_checkpointing_gives_the_same_losses(
    zero3_reference: Path, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    run_dir = run_job(
        tmp_path,
        write_spec,
        tiny_llama,
        "gc",
        resources=ZERO3,
        train=STEPS,
        model={"gradient_checkpointing": True},
    )
    with_checkpointing, without = losses(run_dir), losses(zero3_reference)
    assert with_checkpointing.keys() == without.keys()
    for step, loss in without.items():
        assert abs(with_checkpointing[step] - loss) <= 1e-5, (step, with_checkpointing[step], loss)


def test_zero3_with_cpu_offload_of_parameters_and_optimizer(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    offload = {**ZERO3, "zero": {"stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}}
    run_dir = run_job(tmp_path, write_spec, tiny_llama, "offload", resources=offload, train=STEPS)
    config = json.loads((run_dir / "plan.json").read_text())["deepspeed_config"]["zero_optimization"]
    assert config["offload_param"]["device"] == config["offload_optimizer"]["device"] == "cpu"
    assert_learned_and_adapter_reloads(run_dir, tiny_llama)


def test_sigkill_then_resume_under_zero3_matches_the_uninterrupted_run(
    zero3_reference: Path, tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = write_spec(tiny_job(tiny_llama, tmp_path, resources=ZERO3, train=STEPS))
    before = shm_segments()
    process = start_flotilla("run", str(spec), start_new_session=True)
    deadline = time.time() + 400
    sealed = tmp_path / "runs" / "tiny"
    while time.time() < deadline and not list(
        sealed.glob("*/checkpoints/checkpoint-3/flotilla-checkpoint.json")
    ):
        assert process.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI, DeepSpeed's launcher and both ranks
    process.wait()
    # a killed CLI cannot remove its ranks' shared-memory segments: the test does
    for segment in shm_segments() - before:
        segment.unlink()
    run_dir = only_run_dir(tmp_path / "runs")
    assert not (run_dir / "summary.json").exists()
    resumed = flotilla("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    match = re.search(r"resuming from \S*checkpoint-(\d+)", resumed.stderr.replace("\n", ""))
    assert match, resumed.stderr[-3000:]
    start = int(match.group(1))
    after, reference = losses(run_dir), losses(zero3_reference)
    assert max(after) == 8 and start in (3, 6)
    for step in range(start + 1, 9):
        assert abs(after[step] - reference[step]) <= 1e-6, (step, after[step], reference[step])


def test_per_node_launchers_form_one_job_across_two_nodes(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    """The Slurm path: one DeepSpeed launcher per node, node rank from $SLURM_NODEID (here 2 on loopback)."""
    two_nodes = {"backend": "deepspeed", "nodes": 2, "processes_per_node": 1, "zero": {"stage": 3}}
    spec = write_spec(tiny_job(tiny_llama, tmp_path, resources=two_nodes, train={"max_steps": 3}))
    from launcher.plan.jobs import prepare_run

    prepared = prepare_run(spec, [])
    plan: Plan = prepared.plan
    hostfile = write_hostfile(prepared.run_dir / "hostfile", ["node-a", "node-b"], 1)
    port = str(_free_port())
    command = launcher_command(
        plan, rank_source="slurm", master_addr="$MASTER_ADDR", master_port="$MASTER_PORT", hostfile=hostfile
    )
    assert "--no_ssh" in command and "--node_rank=$SLURM_NODEID" in command
    env = {
        **os.environ,
        **QUIET_ENV,
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
    nodes = [
        subprocess.Popen(
            [_expand(arg, {**env, "SLURM_NODEID": str(node)}) for arg in command],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "preflight: 2 ranks" in outputs[0]
    assert json.loads((prepared.run_dir / "summary.json").read_text())["steps"] == 3
    assert_adapter_reloads_equal(tiny_llama, prepared.run_dir)  # gathered from both nodes' ZeRO-3 shards


def test_real_smollm2_zero3_lora_run(tmp_path: Path, write_spec) -> None:
    spec = tiny_job(
        Path("smollm2-135m-instruct"),
        tmp_path,
        resources=ZERO3,
        data={"max_train_rows": 16, "max_validation_rows": 4, "max_length": 48},
        train={"max_steps": 3, "micro_batch_size": 2, "learning_rate": 1e-3},
        eval={"at_start": True},
    )
    spec["model"] = {"path": "smollm2-135m-instruct"}
    result = flotilla("run", str(write_spec(spec)))
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = only_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["after"]["train_loss"] < summary["before"]["train_loss"]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 30 * 7 * 2 and all(t.numel() > 0 for t in saved.values())


def _free_port() -> int:
    from launcher.backends.commands import free_port

    return free_port()


def _expand(arg: str, env: dict[str, str]) -> str:
    """What the shell does to ``--flag=$VAR`` in the rendered sbatch line."""
    flag, sep, value = arg.partition("=")
    if value.startswith("$"):
        return f"{flag}{sep}{env[value[1:]]}"
    return arg
