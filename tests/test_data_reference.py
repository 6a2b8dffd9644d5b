"""The data pipeline makes the same rows, loss masks, labels and report as the reference snapshot.

The snapshot (``tests/fixtures/data_reference.json``) was written from the row-by-row implementation;
a rewrite of the pipeline (batched, cached, parallel) must keep every case equal to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data_reference import CASES, FIXTURE, snapshot


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_output_equals_the_reference(
    name: str, reference: dict[str, object], tmp_path: Path
) -> None:
    assert snapshot(name, tmp_path) == reference[name]
    assert snapshot(name, tmp_path) == reference[name], "read back from the cache"


@pytest.mark.parametrize("name", ["chat", "instruction-drop-overlong", "classification"])
def test_two_tokenizing_processes_make_the_same_rows(
    name: str, reference: dict[str, object], tmp_path: Path
) -> None:
    assert snapshot(name, tmp_path, num_proc=2) == reference[name]
