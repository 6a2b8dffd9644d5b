"""The data pipeline makes the same rows, loss masks, labels and report as the reference snapshot.

The snapshot (``tests/fixtures/data_reference.json``) was written from the row-by-row implementation;
a rewrite of the pipeline (batched, cached, parallel) must keep every case equal to it.
"""

from __future__ import annotations

import json

import pytest

from tests.data_reference import CASES, FIXTURE, snapshot


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_output_equals_the_reference(name: str, reference: dict[str, object]) -> None:
    assert snapshot(name) == reference[name]
