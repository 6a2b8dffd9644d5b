"""Stream one source's canonical rows into an Arrow file, with per-row keys for the checks.

The rows go to disk in batches and come back memory-mapped, so the data step's memory follows the
batch, not the file. Beside them stay, per row, what the checks need: emptiness, a 16-byte digest of
the whole row (exact dedup) and of its text (train/validation leakage).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from launcher.data.encode import row_text
from launcher.spec import DataFormat

BATCH_ROWS = 10_000
DIGEST_BYTES = 16
#: A 16-byte digest as one sortable numpy scalar (np.unique and np.isin work on it).
DIGEST = np.dtype([("high", "<u8"), ("low", "<u8")])

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMAS = {
    "instruction": pa.schema([("prompt", pa.string()), ("response", pa.string())]),
    "text": pa.schema([("text", pa.string())]),
    "classification": pa.schema([("text", pa.string()), ("label", pa.string())]),
    "chat": pa.schema([("messages", pa.list_(MESSAGE))]),
}


@dataclass
class StagedSource:
    """A source's rows on disk (Arrow stream file) and the per-row check keys."""

    arrow_file: Path
    empty: np.ndarray
    row_keys: np.ndarray
    text_keys: np.ndarray

    def __len__(self) -> int:
        return len(self.empty)


def stage_rows(rows: Iterable[dict[str, Any]], fmt: DataFormat, arrow_file: Path) -> StagedSource:
    """Write ``rows`` to ``arrow_file`` in batches and compute their check keys on the way."""
    schema = SCHEMAS[fmt]
    empty: list[bool] = []
    row_keys = bytearray()
    text_keys = bytearray()
    batch: list[dict[str, Any]] = []
    with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for row in rows:
            text = row_text(row)
            empty.append(not text.strip() or ("response" in row and not row["response"].strip()))
            row_keys += _digest(repr(sorted(row.items())))
            text_keys += _digest(text.strip())
            batch.append(row)
            if len(batch) == BATCH_ROWS:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                batch = []
        if batch or not empty:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
    return StagedSource(
        arrow_file,
        np.asarray(empty, dtype=bool),
        np.frombuffer(bytes(row_keys), dtype=DIGEST),
        np.frombuffer(bytes(text_keys), dtype=DIGEST),
    )


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES).digest()


def first_occurrences(keys: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Of the row indices ``candidates`` (ascending), those whose key has not occurred before."""
    _, first = np.unique(keys[candidates], return_index=True)
    return np.sort(candidates[first])
