"""``flotilla export``: merged folders plain transformers loads, GGUF files transformers' GGUF loader
loads, label names kept, and bad input refused with a message; every check against the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.train.export import GGUF_TOLERANCES, MERGE_TOLERANCE, logits_of, max_abs_diff
from tests.conftest import DATA, flotilla, only_run_dir, tiny_classifier_job, tiny_job

#: Rows of the run's own training data, tokenized, as probes independent of the export's own.
PROBE_ROWS = 3


def train(spec: dict[str, Any], folder: Path, name: str = "tiny") -> Path:
    """Run ``spec`` through the CLI and return its run directory."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")
    result = flotilla("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(folder / "runs", name)


def short_job(model: Path, folder: Path, **sections: Any) -> dict[str, Any]:
    """The tests' tiny job, 4 steps at a learning rate that moves LoRA B well away from zero."""
    return tiny_job(
        model, folder, train={"max_steps": 4, "learning_rate": 5e-3}, eval={"at_start": False}, **sections
    )


@pytest.fixture(scope="module")
def lora_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora-run")
    return train(short_job(tiny_llama, folder), folder)


def probe_rows(tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    rows = [json.loads(line) for line in (DATA / "instructions.jsonl").read_text().splitlines()[:PROBE_ROWS]]
    return [dict(tokenizer(f"{row['prompt']}\n{row['response']}", return_tensors="pt")) for row in rows]


def logits(model: Any, probes: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return logits_of(model.eval(), probes)


def assert_clear_error(result: Any, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())  # rich wraps long messages
    for fragment in fragments:
        assert fragment in text, result.stderr[-3000:]


def no_staging_left(out: Path) -> bool:
    return not list(out.parent.glob(f".{out.name}.*"))


def assert_export_matches_the_adapter(base_model: Path, run: Path, out: Path) -> None:
    """``flotilla export run --merge`` writes a folder plain transformers loads, whose logits equal
    base + adapter within the merge tolerance and differ from the base's, with the chat template."""
    from peft import PeftModel

    result = flotilla("export", str(run), "--merge", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    probes = probe_rows(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    base_logits = logits(base, probes)
    adapted = logits(PeftModel.from_pretrained(base, run / "adapter"), probes)
    exported = logits(merged, probes)
    assert max_abs_diff(exported, adapted) <= MERGE_TOLERANCE
    assert max_abs_diff(exported, base_logits) > 100 * MERGE_TOLERANCE  # the adapter is in the weights
    assert (
        tokenizer.chat_template
        and tokenizer.chat_template == AutoTokenizer.from_pretrained(base_model).chat_template
    )
    record = json.loads((out / "flotilla-export.json").read_text())
    assert record["merge_max_abs_diff"] <= record["merge_tolerance"] == MERGE_TOLERANCE
    assert "logits within" in result.stdout and no_staging_left(out)


def test_merged_folder_loads_with_plain_transformers_and_matches_the_adapter(
    tiny_llama: Path, lora_run: Path, tmp_path: Path
) -> None:
    assert_export_matches_the_adapter(tiny_llama, lora_run, tmp_path / "merged")


def test_an_untrained_adapter_is_refused_and_nothing_is_written(lora_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "untrained"
    shutil.copytree(lora_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, weights)
    out = tmp_path / "merged"
    result = flotilla("export", str(run), "--merge", "--out", str(out))
    assert_clear_error(result, 2, "equal to the base model's", "LoRA B matrix is zero")
    assert not out.exists() and no_staging_left(out)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_loads_back_through_transformers_within_its_bound(
    lora_run: Path, tmp_path: Path, quant: str
) -> None:
    out = tmp_path / "merged"
    result = flotilla("export", str(lora_run), "--merge", "--gguf", "--quant", quant, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    gguf_file = out / "gguf" / f"tiny-{quant}.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    probes = probe_rows(tokenizer)
    merged = logits(AutoModelForCausalLM.from_pretrained(out), probes)
    scale = max(1.0, max(m.abs().max().item() for m in merged))
    diff = max_abs_diff(logits(loaded, probes), merged)
    assert diff <= GGUF_TOLERANCES[quant] * scale, (diff, scale)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert [gguf_tokenizer(t)["input_ids"] for t in ("Hello, world! 123", "<|im_start|>user")] == [
        tokenizer(t)["input_ids"] for t in ("Hello, world! 123", "<|im_start|>user")
    ]
    print(f"gguf {quant}: max abs logit diff {diff:.3g} (largest |logit| {scale:.3g})")


def test_a_classifier_export_names_its_labels(tmp_path: Path) -> None:
    spec = tiny_classifier_job(tmp_path / "runs", max_steps=3)
    run = train(spec, tmp_path, "cls")
    labels = json.loads((run / "summary.json").read_text())["labels"]
    assert labels and all(not name.isdigit() for name in labels)
    beside = json.loads((run / "adapter" / "labels.json").read_text())
    assert beside["labels"] == labels and beside["label2id"] == {n: i for i, n in enumerate(labels)}
    out = tmp_path / "merged"
    result = flotilla("export", str(run / "adapter"), "--merge", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(labels)}
    assert config["label2id"] == {n: i for i, n in enumerate(labels)}


def test_bad_input_gets_a_message_not_a_traceback(tiny_llama: Path, lora_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clear_error(flotilla("export", str(empty), "--merge"), 2, "neither a run directory")
    assert_clear_error(flotilla("export", str(tmp_path / "missing"), "--merge"), 2, "does not exist")
    assert_clear_error(flotilla("export", str(lora_run)), 2, "needs --merge")
    no_adapter = tmp_path / "no-adapter"
    shutil.copytree(lora_run, no_adapter, ignore=shutil.ignore_patterns("adapter"))
    assert_clear_error(flotilla("export", str(no_adapter), "--merge"), 2, "has no trained adapter/")
    taken = tmp_path / "taken"
    taken.mkdir()
    assert_clear_error(
        flotilla("export", str(lora_run), "--merge", "--out", str(taken)), 2, "already exists", "--force"
    )
    assert not list(taken.iterdir())
    full = train(short_job(tiny_llama, tmp_path / "full", peft={"method": "none"}), tmp_path / "full")
    assert_clear_error(flotilla("export", str(full), "--merge"), 2, "full fine-tune", "no adapter to merge")


def test_gguf_refuses_an_architecture_it_cannot_write(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(only_tokenizer(tmp_path))
    model_dir = tmp_path / "tiny-qwen2"
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = train(short_job(model_dir, tmp_path), tmp_path)
    out = tmp_path / "merged"
    result = flotilla("export", str(run), "--merge", "--gguf", "--out", str(out))
    assert_clear_error(result, 2, "--gguf supports the llama architecture, not 'qwen2'")
    assert not out.exists() and no_staging_left(out)


def only_tokenizer(folder: Path) -> Path:
    """SmolLM2's tokenizer saved alone into ``folder``/tokenizer."""
    from launcher.model import load_tokenizer
    from launcher.spec import ModelSpec

    target = folder / "tokenizer"
    load_tokenizer(ModelSpec(path="smollm2-135m-instruct")).save_pretrained(target)
    return target


def test_the_bundled_smollm2_round_trips_through_gguf(tmp_path: Path) -> None:
    """The real SmolLM2-135M (no training: the GGUF writer is what is under test) within both bounds."""
    from launcher.model import load_model, load_tokenizer
    from launcher.spec import ModelSpec
    from launcher.train.export import logits_of, max_abs_diff, probe_inputs
    from launcher.train.gguf_export import write_gguf

    spec = ModelSpec(path="smollm2-135m-instruct")
    model, tokenizer = load_model(spec).eval(), load_tokenizer(spec)
    tokenizer.save_pretrained(tmp_path)
    probes = probe_inputs(tokenizer, "causal_lm")
    reference = logits_of(model, probes)
    scale = max(1.0, max(r.abs().max().item() for r in reference))
    for quant in ("f16", "q8_0"):
        folder = tmp_path / quant
        folder.mkdir()
        write_gguf(model, tokenizer, tmp_path, folder / "smollm2.gguf", quant)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file="smollm2.gguf", dtype=torch.float32)
        diff = max_abs_diff(reference, logits_of(loaded.eval(), probes))
        assert diff <= GGUF_TOLERANCES[quant] * scale, (quant, diff, scale)
        print(f"smollm2 {quant}: max abs logit diff {diff:.3g} (largest |logit| {scale:.3g})")
