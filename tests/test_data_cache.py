"""The prepared-data cache: keyed on files, tokenizer and data keys; built by one process of many;
and bad rows deep inside large files of every format named by file and line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from launcher.data.prepare import prepare_data
from launcher.data.read import SourceReader
from launcher.errors import DataError
from launcher.model.load import load_tokenizer
from launcher.spec.models import DataSpec, FieldMap, ModelSpec
from tests.conftest import start_flotilla, tiny_job

ROWS = 20_000
DEEP = 17_321


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(path="smollm2-135m-instruct"))


def rows(count: int) -> list[dict[str, str]]:
    return [{"prompt": f"What is {i} plus {i}?", "response": f"Answer: {2 * i}."} for i in range(count)]


def write_jsonl(path: Path, items: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def test_a_changed_file_or_data_key_prepares_again_and_batching_keys_reuse(tmp_path: Path, tokenizer) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows(40))
    said: list[str] = []

    def prepare(**keys: object):
        spec = DataSpec.model_validate({"train": str(train), "validation_ratio": 0.0, **keys})
        return prepare_data(spec, tokenizer, 0, tmp_path / "cache", console=said.append)

    first = prepare()
    assert said[-1].startswith("data: prepared") and len(first.train) == 40
    assert prepare().cache_folder == first.cache_folder and said[-1].startswith("data: reused")
    assert prepare(packing=True, num_proc=2).cache_folder == first.cache_folder
    assert said[-1].startswith("data: reused"), "packing and worker count do not change the rows"
    longest = max(first.train["length"])
    shorter = prepare(max_length=longest - 2)
    assert said[-1].startswith("data: prepared") and shorter.cache_folder != first.cache_folder
    assert max(shorter.train["length"]) == longest - 2
    write_jsonl(train, rows(41))
    grown = prepare()
    assert said[-1].startswith("data: prepared") and len(grown.train) == 41, "a changed file is read again"
    assert len(first.train) == 40, "the earlier folder is untouched (memory-mapped readers keep working)"


def test_two_processes_at_once_prepare_the_data_once(tiny_llama: Path, tmp_path: Path) -> None:
    """Two ``flotilla preprocess`` of one job started together (two ranks, or two nodes on shared
    storage): one prepares, the other waits on the lock and reads what the first published."""
    write_jsonl(tmp_path / "train.jsonl", rows(ROWS // 4))
    spec = tiny_job(
        tiny_llama, tmp_path, data={"train": str(tmp_path / "train.jsonl"), "max_train_rows": None}
    )
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    both = [
        start_flotilla("preprocess", str(spec_file), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in "ab"
    ]
    outputs = [process.communicate(timeout=300)[0] for process in both]
    assert [process.returncode for process in both] == [0, 0], outputs
    verbs = sorted("prepared" if "data: prepared in" in out else "reused" for out in outputs)
    assert verbs == ["prepared", "reused"], outputs
    folders = {
        line.split(": ", 1)[1]
        for out in outputs
        for line in out.splitlines()
        if line.startswith("prepared data:")
    }
    assert len(folders) == 1 and all(f"train rows {ROWS // 4}," in out for out in outputs)
    assert not list((tmp_path / "runs" / ".flotilla-cache" / "data").glob("*.staging-*")), "no staging left"


def _jsonl_with_bad_line(path: Path) -> tuple[Path, str, str]:
    items = [json.dumps(item) for item in rows(ROWS)]
    items[DEEP - 1] = '{"prompt": "cut off'
    path.write_text("\n".join(items) + "\n", encoding="utf-8")
    return path, f"{path}:{DEEP}", "invalid JSON"


def _csv_with_missing_field(path: Path) -> tuple[Path, str, str]:
    frame = pd.DataFrame(rows(ROWS))
    frame.loc[DEEP - 1, "response"] = None
    frame.to_csv(path, index=False)
    return path, f"{path}:{DEEP + 1}", "field 'response' must be a string"  # line 1 is the header


def _parquet_with_null(path: Path) -> tuple[Path, str, str]:
    frame = pd.DataFrame(rows(ROWS))
    frame.loc[DEEP - 1, "response"] = None
    frame.to_parquet(path)
    return path, f"{path}: row {DEEP}", "field 'response' must be a string"  # rows, not lines


@pytest.mark.parametrize(
    ("make", "suffix"),
    [(_jsonl_with_bad_line, "jsonl"), (_csv_with_missing_field, "csv"), (_parquet_with_null, "parquet")],
)
def test_a_bad_row_deep_inside_a_large_file_is_named_by_file_and_line(
    make, suffix: str, tmp_path: Path
) -> None:
    path, where, needle = make(tmp_path / f"train.{suffix}")
    with pytest.raises(DataError) as caught:
        list(SourceReader(str(path), "instruction", FieldMap(), "error"))
    assert f"{where}: {needle}" in str(caught.value)
    skipped = SourceReader(str(path), "instruction", FieldMap(), "skip")
    assert sum(1 for _ in skipped) == ROWS - 1
    assert skipped.bad_rows == 1 and skipped.rows_read == ROWS
    assert skipped.bad_row_examples[0].startswith(f"{where}: {needle}")
