"""Cases and a snapshot of the data pipeline's output, to hold a rewrite to the same rows.

``python -m tests.data_reference`` rewrites ``tests/fixtures/data_reference.json`` from the code as it
is; it was written from the row-by-row implementation before the pipeline moved onto ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from launcher.data import prepare_data
from launcher.model import load_tokenizer
from launcher.spec import DataSpec, ModelSpec
from tests.conftest import DATA, REPO

FIXTURE = REPO / "tests" / "fixtures" / "data_reference.json"

#: name → (tokenizer, data spec): every format, the chat template and the template-free path,
#: a mixture, explicit and ratio validation splits, truncation and dropping of overlong rows.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "instruction": (
        "smollm2-135m-instruct",
        {
            "train": f"{DATA}/instructions.jsonl",
            "validation": f"{DATA}/instructions_val.jsonl",
            "max_length": 64,
        },
    ),
    "instruction-drop-overlong": (
        "smollm2-135m-instruct",
        {
            "train": f"{DATA}/realistic_lengths.jsonl",
            "max_length": 96,
            "drop_overlong": True,
        },
    ),
    "chat": (
        "smollm2-135m-instruct",
        {
            "train": f"{DATA}/chat.jsonl",
            "format": "chat",
            "max_length": 384,
        },
    ),
    "chat-no-template": (
        "minilm-l6",
        {
            "train": f"{DATA}/chat.jsonl",
            "format": "chat",
            "max_length": 128,
        },
    ),
    "text": (
        "smollm2-135m-instruct",
        {
            "train": f"{DATA}/sentiment.jsonl",
            "format": "text",
            "max_length": 32,
            "dedup": False,
        },
    ),
    "classification": (
        "minilm-l6",
        {
            "train": f"{DATA}/sentiment.jsonl",
            "validation": f"{DATA}/sentiment_val.jsonl",
            "format": "classification",
            "max_length": 24,
        },
    ),
    "mixture": (
        "smollm2-135m-instruct",
        {
            "train": [
                {"path": f"{DATA}/mixture_math.jsonl", "weight": 3.0},
                {"path": f"{DATA}/mixture_capitals.jsonl", "weight": 1.0},
            ],
            "validation_ratio": 0.2,
            "max_length": 128,
            "max_train_rows": 150,
        },
    ),
}


def _digest(values: list[Any]) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _split(dataset: Any) -> dict[str, Any] | None:
    if dataset is None:
        return None
    columns = dataset.select_columns(["input_ids", "labels", "length", "full_length"]).to_dict()
    return {
        "rows": len(dataset),
        "first": {"input_ids": columns["input_ids"][0], "labels": columns["labels"][0]},
        "digests": {name: _digest(values) for name, values in columns.items()},
    }


def snapshot(name: str, cache_root: Path, **keys: Any) -> dict[str, Any]:
    """What the pipeline makes of case ``name`` (``keys`` added to its data spec): per split row
    counts, digests and a first row, the labels and the data report (paths relative to the repository)."""
    tokenizer_name, data = CASES[name]
    spec = DataSpec.model_validate({**data, **keys})
    prepared = prepare_data(spec, load_tokenizer(ModelSpec(path=tokenizer_name)), 7, cache_root)
    report = json.loads(json.dumps(prepared.report.to_dict()).replace(f"{REPO}/", ""))
    return {
        "train": _split(prepared.train),
        "validation": _split(prepared.validation),
        "train_probe": _split(prepared.train_probe),
        "labels": prepared.labels,
        "report": report,
    }


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:
        FIXTURE.write_text(json.dumps({name: snapshot(name, Path(cache)) for name in CASES}, indent=1) + "\n")
    sys.stdout.write(f"wrote {FIXTURE}\n")
