"""Read rows from JSONL, CSV or Parquet files (or a hub dataset) and check each row's shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import DataError
from launcher.spec import DataFormat, FieldMap

ROLES = {"system", "user", "assistant"}


@dataclass
class LoadedRows:
    """Rows of one source, normalised to the format's canonical keys, plus what was skipped."""

    source: str
    rows: list[dict[str, Any]]
    bad_rows: list[str] = field(default_factory=list)


def read_source(
    path: str, fmt: DataFormat, fields: FieldMap, on_bad_rows: str, split: str = "train"
) -> LoadedRows:
    """Read ``path`` and return rows with keys prompt/response, text, label or messages."""
    raw_rows = _read_raw(path, split)
    loaded = LoadedRows(source=path, rows=[])
    for line, row in raw_rows:
        try:
            if isinstance(row, Exception):
                raise ValueError(f"invalid JSON ({row})")
            loaded.rows.append(normalise_row(row, fmt, fields))
        except ValueError as exc:
            message = f"{path}:{line}: {exc}"
            if on_bad_rows == "error":
                raise DataError(
                    f"{message}\n(set data.on_bad_rows: skip to skip and count such rows)"
                ) from None
            loaded.bad_rows.append(message)
    if not loaded.rows:
        raise DataError(f"{path}: no usable rows ({len(loaded.bad_rows)} bad)")
    return loaded


def _read_raw(path: str, split: str) -> list[tuple[int, dict[str, Any] | Exception]]:
    """(line number, row or parse error) for every row of the file."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in {".jsonl", ".json", ".csv", ".parquet", ".pq"} and not file.is_file():
        raise DataError(f"{path}: data file does not exist")
    if suffix in {".jsonl", ".json"}:
        return _read_jsonl(file)
    if suffix == ".csv":
        return [(index + 2, row) for index, row in enumerate(_load_with_datasets("csv", path))]
    if suffix in {".parquet", ".pq"}:
        return [(index + 1, row) for index, row in enumerate(_load_with_datasets("parquet", path))]
    if file.exists():
        raise DataError(f"{path}: unsupported data file type; use .jsonl, .csv or .parquet")
    return [(index + 1, row) for index, row in enumerate(_load_hub(path, split))]


def _read_jsonl(file: Path) -> list[tuple[int, dict[str, Any] | Exception]]:
    rows: list[tuple[int, dict[str, Any] | Exception]] = []
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc})") from None
    if file.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        return [(index + 1, item) for index, item in enumerate(items)]
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append((number, ValueError(exc.msg)))
    return rows


def _load_with_datasets(kind: str, path: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(kind, data_files=path, split="train"))
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot read as {kind}: {exc}") from None


def _load_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:  # offline, unknown name, bad split
        raise DataError(f"{name}: not a local file, and loading it as a hub dataset failed: {exc}") from None


def normalise_row(row: Any, fmt: DataFormat, fields: FieldMap) -> dict[str, Any]:
    """Map a raw row to canonical keys; raise ValueError naming what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "instruction":
        return {
            "prompt": _string(row, fields.prompt),
            "response": _string(row, fields.response),
        }
    if fmt == "text":
        return {"text": _string(row, fields.text)}
    if fmt == "classification":
        label = _value(row, fields.label)
        if not isinstance(label, str | int) or isinstance(label, bool):
            raise ValueError(f"field {fields.label!r} must be a string or integer label")
        return {"text": _string(row, fields.text), "label": str(label)}
    return {"messages": _messages(row, fields.messages)}


def _value(row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise ValueError(f"missing field {key!r} (row has: {', '.join(sorted(row)) or 'nothing'})")
    return row[key]


def _string(row: dict[str, Any], key: str) -> str:
    value = _value(row, key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__} {value!r:.40}")
    return value


def _messages(row: dict[str, Any], key: str) -> list[dict[str, str]]:
    messages = _value(row, key)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field {key!r} must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{key}[{index}].role must be one of {sorted(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{key}[{index}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{key} has no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
