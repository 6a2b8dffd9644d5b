"""Data loading, checks and encoding: clear errors with file and line, the report, loss masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.data.encode import IGNORE_INDEX, encode_row
from launcher.data.prepare import prepare_data
from launcher.data.read import SourceReader
from launcher.errors import DataError
from launcher.model.load import load_tokenizer
from launcher.spec.models import DataSpec, FieldMap, ModelSpec
from tests.conftest import DATA


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(path="smollm2-135m-instruct"))


@pytest.mark.parametrize(
    ("name", "line", "needle"),
    [
        ("bad_json.jsonl", 3, "invalid JSON"),
        ("missing_field.jsonl", 2, "missing field 'response'"),
        ("wrong_type.jsonl", 4, "field 'response' must be a string"),
    ],
)
def test_bad_rows_name_file_and_line(name: str, line: int, needle: str) -> None:
    path = str(DATA / "bad" / name)
    with pytest.raises(DataError) as caught:
        list(SourceReader(path, "instruction", FieldMap(), "error"))
    assert f"{path}:{line}: {needle}" in str(caught.value)
    skipped = SourceReader(path, "instruction", FieldMap(), "skip")
    assert len(list(skipped)) == 4 and skipped.bad_rows == 1
    assert skipped.bad_row_examples[0].startswith(f"{path}:{line}: {needle}")


def test_report_counts_duplicates_empty_rows_and_leakage(tmp_path: Path, tokenizer) -> None:
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    rows += [rows[0], rows[1], {"prompt": "q", "response": "  "}]
    train.write_text("\n".join(json.dumps(r) for r in rows))
    validation = tmp_path / "val.jsonl"
    validation.write_text("\n".join(json.dumps(r) for r in [rows[2], {"prompt": "new", "response": "x"}]))
    spec = DataSpec(train=[{"path": str(train)}], validation=[{"path": str(validation)}])
    report = prepare_data(spec, tokenizer, 0, tmp_path).report
    assert report.sources[0].duplicates_removed == 2
    assert report.sources[0].empty_rows == 1
    assert report.leaked_rows == 1 and report.train_rows == 10 and report.validation_rows == 2
    assert set(report.token_length_percentiles) == {"p50", "p90", "p99", "max"}


def test_validation_split_from_ratio_and_label_balance(tokenizer, tmp_path: Path) -> None:
    spec = DataSpec(
        train=[{"path": str(DATA / "sentiment.jsonl")}], format="classification", validation_ratio=0.25
    )
    data = prepare_data(spec, tokenizer, 0, tmp_path)
    assert data.labels == ["negative", "positive"]
    assert len(data.validation) == 120 and len(data.train) == 360
    assert sum(data.report.label_balance.values()) == 360


def test_rows_keep_file_order_without_shuffle(tokenizer, tmp_path: Path) -> None:
    """``data.shuffle: false``: the validation rows are the file's first ones, then training follows
    the file (with shuffling, the seeded order differs)."""
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(20)))

    def first_tokens(shuffle: bool) -> list[list[int]]:
        spec = DataSpec(train=[{"path": str(train)}], validation_ratio=0.1, shuffle=shuffle)
        data = prepare_data(spec, tokenizer, 0, tmp_path / str(shuffle))
        return [row["input_ids"] for row in data.validation] + [row["input_ids"] for row in data.train]

    in_order = first_tokens(False)
    expected = [
        encode_row({"prompt": f"q{i}", "response": f"a{i}"}, tokenizer, 512)["input_ids"] for i in range(20)
    ]
    assert in_order == expected
    assert first_tokens(True) != expected


def test_chat_loss_is_on_assistant_turns_only(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Answer: Paris."},
        {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Answer: Madrid."},
    ]
    item = encode_row({"messages": messages}, tokenizer, max_length=512)
    learned = [t for t in item["labels"] if t != IGNORE_INDEX]
    text = tokenizer.decode(learned)
    assert "Answer: Paris." in text and "Answer: Madrid." in text
    assert "Capital" not in text and "Spain" not in text and "Be brief" not in text
    assert text.count("<|im_end|>") == 2


def test_instruction_rows_learn_the_response_only(tokenizer) -> None:
    item = encode_row({"prompt": "Say hi.", "response": "Answer: hi."}, tokenizer, max_length=512)
    learned = tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])
    assert learned.startswith("Answer: hi.") and "Say hi" not in learned


def test_mixture_weights_shape_the_training_set(tokenizer, tmp_path: Path) -> None:
    spec = DataSpec(
        train=[
            {"path": str(DATA / "mixture_math.jsonl"), "weight": 3.0},
            {"path": str(DATA / "mixture_capitals.jsonl"), "weight": 1.0},
        ],
        validation_ratio=0.0,
    )
    data = prepare_data(spec, tokenizer, 0, tmp_path)
    texts = tokenizer.batch_decode(list(data.train["input_ids"]))
    capitals = [t for t in texts if "capital" in t]
    assert 0.65 < 1 - len(capitals) / len(texts) < 0.85, "3:1 weights draw about 3 math rows per capital"
    assert len(set(capitals)) == 100, "all_exhausted: every row of the smaller-weight source is drawn"
    assert len(texts) > len(set(texts)), "the larger-weight source is drawn again once it is exhausted"
