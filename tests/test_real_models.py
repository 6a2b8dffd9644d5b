"""End-to-end through the CLI on the real bundled models: SmolLM2 (GGUF) and MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import DATA, REPO, flotilla, only_run_dir


def test_quickstart_on_real_smollm2_lowers_validation_loss(tmp_path: Path) -> None:
    result = flotilla(
        "run",
        "configs/quickstart.yaml",
        f"output.dir={tmp_path}",
        "train.max_steps=4",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "data.max_validation_rows=16",
        "data.max_train_rows=64",
        "eval.steps=null",
        "train.save_steps=100",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    run_dir = only_run_dir(tmp_path, "quickstart")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["after"]["eval_perplexity"] < summary["before"]["eval_perplexity"]
    assert "eval_perplexity" in result.stdout and str(run_dir / "adapter") in result.stdout
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_minilm_classification_beats_the_majority_class(tmp_path: Path) -> None:
    result = flotilla("run", "configs/classify-minilm.yaml", f"output.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path, "classify-minilm")
    metrics_file = tmp_path / "eval.json"
    evaluation = flotilla(
        "eval", str(run_dir), "--data", str(DATA / "sentiment_val.jsonl"), "--json", str(metrics_file)
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads(metrics_file.read_text())
    assert metrics["rows"] == 120
    assert metrics["eval_accuracy"] > metrics["majority_baseline_accuracy"] + 0.1
    assert 0.0 <= metrics["eval_f1"] <= 1.0 and metrics["eval_auc"] > 0.5


def test_bad_spec_gives_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad\nmodel:\n  path: smollm2-135m-instruct\n  lora: yes\ndata:\n  train: x.jsonl\n"
    )
    result = flotilla("run", str(spec))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{spec}" in result.stderr and "line 4: model.lora: unknown key" in result.stderr


def test_bad_data_file_gives_file_and_line(tmp_path: Path) -> None:
    bad = DATA / "bad" / "wrong_type.jsonl"
    result = flotilla(
        "run",
        "configs/quickstart.yaml",
        f"output.dir={tmp_path}",
        f"data.train={bad}",
        "data.validation=[]",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"{bad}:4: field 'response' must be a string" in " ".join(result.stderr.split())
    assert "on_bad_rows: skip" in result.stderr


def test_validate_command_accepts_shipped_configs() -> None:
    for name in ("quickstart.yaml", "classify-minilm.yaml"):
        result = flotilla("validate", str(REPO / "configs" / name))
        assert result.returncode == 0 and "ok" in result.stdout
