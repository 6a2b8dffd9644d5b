"""Read rows from JSONL, CSV or Parquet files (or a hub dataset) and check each row's shape."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import DataError
from launcher.spec import DataFormat, FieldMap

ROLES = {"system", "user", "assistant"}


#: Bad-row messages kept for the report (every bad row is counted).
BAD_ROW_EXAMPLES = 5


@dataclass
class SourceReader:
    """Iterate the rows of one source, normalised to the format's canonical keys, one at a time.

    A bad row raises a DataError naming its file and line, or (``on_bad_rows: skip``) is counted;
    rows are never all held in memory, so a large file streams.
    """

    path: str
    fmt: DataFormat
    fields: FieldMap
    on_bad_rows: str
    split: str = "train"
    rows_read: int = 0
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        usable = 0
        for where, row in _read_raw(self.path, self.split):
            self.rows_read += 1
            try:
                if isinstance(row, Exception):
                    raise row
                normalised = normalise_row(row, self.fmt, self.fields)
            except ValueError as exc:
                self._bad(f"{where}: {exc}")
                continue
            usable += 1
            yield normalised
        if not usable:
            first = f"; the first: {self.bad_row_examples[0]}" if self.bad_row_examples else ""
            raise DataError(f"{self.path}: no usable rows ({self.bad_rows} bad{first})")

    def _bad(self, message: str) -> None:
        if self.on_bad_rows == "error":
            raise DataError(f"{message}\n(set data.on_bad_rows: skip to skip and count such rows)")
        self.bad_rows += 1
        if len(self.bad_row_examples) < BAD_ROW_EXAMPLES:
            self.bad_row_examples.append(message)


def _read_raw(path: str, split: str) -> Iterator[tuple[str, Any]]:
    """(where, row or parse error) for every row of the file, streamed.

    ``where`` is ``file:line`` for text files (an editor jumps there) and ``file: row N`` (1-based)
    for Parquet, hub datasets and JSON arrays, whose rows are not lines.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in {".jsonl", ".json", ".csv", ".parquet", ".pq"} and not file.is_file():
        raise DataError(f"{path}: data file does not exist")
    if suffix in {".jsonl", ".json"}:
        return _read_jsonl(file)
    if suffix == ".csv":
        return _decoded(_load_with_datasets("csv", path), lambda n: f"{path}:{n + 1}")
    if suffix in {".parquet", ".pq"}:
        return _decoded(_load_with_datasets("parquet", path), _row_of(path))
    if file.exists():
        raise DataError(f"{path}: unsupported data file type; use .jsonl, .csv or .parquet")
    return _decoded(_load_hub(path, split), _row_of(path))


def _row_of(path: str) -> Callable[[int], str]:
    return lambda number: f"{path}: row {number}"


def _decoded(rows: Iterable[dict[str, Any]], where: Callable[[int], str]) -> Iterator[tuple[str, Any]]:
    """Rows of a dataset with where each is; a row that cannot be decoded (a damaged page) names its row."""
    iterator, number = iter(rows), 1
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # Arrow raises several types while decoding a damaged file
            raise DataError(f"{where(number)}: cannot decode this row: {_root_cause(exc)}") from None
        yield where(number), row
        number += 1


def _read_jsonl(file: Path) -> Iterator[tuple[str, Any]]:
    """Line by line (a JSON array file is parsed whole): memory follows one line, not the file."""
    if file.suffix.lower() == ".json" and _starts_with_bracket(file):
        try:
            items = json.loads(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{file}: not UTF-8 text ({exc})") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        where = _row_of(str(file))
        for number, item in enumerate(items, start=1):
            yield where(number), item
        return
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:  # a bad row like any other: skipped and counted, or named
                yield f"{file}:{number}", ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                yield f"{file}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{file}:{number}", ValueError(f"invalid JSON ({exc.msg})")


def _starts_with_bracket(file: Path) -> bool:
    with file.open("rb") as handle:
        return handle.read(4096).lstrip().startswith(b"[")


def _load_with_datasets(kind: str, path: str) -> Iterable[dict[str, Any]]:
    """The file through datasets' own loader: Arrow on disk, memory-mapped, iterated row by row."""
    import datasets

    try:
        return datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot read as {kind}: {_root_cause(exc)}") from None


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message: datasets wraps the parser's (which names the row) in its own."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {exc}".strip()


def _load_hub(name: str, split: str) -> Iterable[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
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
