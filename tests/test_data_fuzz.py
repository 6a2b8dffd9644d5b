"""Fuzzed data files never end in a traceback: a clear error naming the file (and the line, where a
line is at fault), or rows skipped and counted (``on_bad_rows: skip``). 500 cases in all.

Each case starts from valid rows and damages them as files are damaged in practice: truncated
mid-row, random bytes inserted, a byte flipped, re-encoded (Latin-1, UTF-16), a BOM, NUL bytes,
a huge line, CRLF endings, or replaced by binary garbage; plus rows of the wrong shape.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from launcher.data.read import SourceReader
from launcher.errors import DataError
from launcher.spec import FieldMap
from tests.conftest import DATA

VALID = [json.loads(line) for line in (DATA / "instructions.jsonl").read_text().splitlines()[:12]]
CHAT = [json.loads(line) for line in (DATA / "chat.jsonl").read_text().splitlines()[:6]]
MUTATIONS = ["none", "truncate", "insert", "flip", "latin1", "utf16", "bom", "nul", "huge", "crlf", "binary"]
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
wrong_rows = st.dictionaries(
    st.sampled_from(["prompt", "response", "messages", "other"]), json_values, max_size=3
)
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["a,b", 'say "hi"', "two\nlines", "tab\there", "", " ", "é ü 漢字 🙂"]
)


def damage(data: bytes, mutation: str, position: int, noise: bytes) -> bytes:
    """``data`` damaged by ``mutation`` at ``position`` (a fraction of the length, in thousandths)."""
    at = len(data) * position // 1000
    text = data.decode("utf-8", errors="replace")
    return {
        "none": lambda: data,
        "truncate": lambda: data[:at],
        "insert": lambda: data[:at] + noise + data[at:],
        "flip": lambda: data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :] if at < len(data) else data,
        "latin1": lambda: text.encode("latin-1", errors="replace"),
        "utf16": lambda: text.encode("utf-16"),
        "bom": lambda: b"\xef\xbb\xbf" + data,
        "nul": lambda: data[:at] + b"\x00" * 8 + data[at:],
        "huge": lambda: data + b'{"prompt": "' + b"x" * 2_000_000 + b'", "response": "y"}\n',
        "crlf": lambda: data.replace(b"\n", b"\r\n"),
        "binary": lambda: noise * 50,
    }[mutation]()


def assert_read_or_clear_error(path: Path, fmt: str, on_bad_rows: str, rows_written: int = 0) -> None:
    """Reading ``path`` yields well-formed rows, or a DataError naming the file and a real line or row.

    A text file's errors name a line within the file; a Parquet file's (``rows_written`` > 0) name a
    row among those written.
    """
    lines = path.read_bytes().count(b"\n") + 1
    try:
        reader = SourceReader(str(path), fmt, FieldMap(), on_bad_rows)  # type: ignore[arg-type]
        rows = list(reader)
    except DataError as exc:
        message = str(exc)
        assert str(path) in message, message
        at_line = re.match(rf"{re.escape(str(path))}:(\d+):", message)
        at_row = re.match(rf"{re.escape(str(path))}: row (\d+):", message)
        if rows_written:
            assert not at_line, message
            if at_row:
                assert 1 <= int(at_row[1]) <= rows_written, message
        else:
            assert not at_row, message
            if at_line:
                assert 1 <= int(at_line[1]) <= lines + 1, message
        return
    for row in rows:
        if fmt == "chat":
            assert all(isinstance(m["content"], str) for m in row["messages"])
        else:
            assert isinstance(row["prompt"], str) and isinstance(row["response"], str)
    assert reader.rows_read == len(rows) + reader.bad_rows
    if on_bad_rows == "error":
        assert reader.bad_rows == 0


@settings(FUZZ, max_examples=300)
@given(
    fmt=st.sampled_from(["instruction", "chat"]),
    rows=st.lists(st.integers(0, 11) | wrong_rows | json_values, max_size=8),
    mutation=st.sampled_from(MUTATIONS),
    position=st.integers(0, 999),
    noise=st.binary(min_size=1, max_size=16),
    on_bad_rows=st.sampled_from(["error", "skip"]),
)
def test_fuzzed_jsonl_files(
    fmt: str, rows: list[Any], mutation: str, position: int, noise: bytes, on_bad_rows: str
) -> None:
    valid = VALID if fmt == "instruction" else CHAT
    objects = [
        valid[row % len(valid)] if isinstance(row, int) and not isinstance(row, bool) else row for row in rows
    ]
    data = "".join(json.dumps(row) + "\n" for row in objects).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "fuzz.jsonl")
        path.write_bytes(damage(data, mutation, position, noise))
        assert_read_or_clear_error(path, fmt, on_bad_rows)


@settings(FUZZ, max_examples=100)
@given(
    rows=st.lists(st.tuples(odd_text | st.none(), odd_text | st.integers()), max_size=6),
    header=st.sampled_from([["prompt", "response"], ["prompt"], ["response", "prompt", "extra"], ["a", "b"]]),
    mutation=st.sampled_from(MUTATIONS),
    position=st.integers(0, 999),
    noise=st.binary(min_size=1, max_size=16),
    on_bad_rows=st.sampled_from(["error", "skip"]),
)
def test_fuzzed_csv_files(
    rows: list[tuple[Any, Any]],
    header: list[str],
    mutation: str,
    position: int,
    noise: bytes,
    on_bad_rows: str,
) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows([[*row, *[""] * (len(header) - 2)][: len(header)] for row in rows])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "fuzz.csv")
        path.write_bytes(damage(text.getvalue().encode(), mutation, position, noise))
        assert_read_or_clear_error(path, "instruction", on_bad_rows)


@settings(FUZZ, max_examples=100)
@given(
    prompts=st.lists(odd_text | st.none(), min_size=1, max_size=6),
    responses=st.sampled_from(["strings", "integers", "missing"]),
    mutation=st.sampled_from(["none", "truncate", "insert", "flip", "binary"]),
    position=st.integers(0, 999),
    noise=st.binary(min_size=1, max_size=16),
    on_bad_rows=st.sampled_from(["error", "skip"]),
)
@example(  # CI found it: a null prompt in row 5 of 6 (a row number, not a line of the binary file)
    prompts=["", "", "", "", None, ""],
    responses="strings",
    mutation="none",
    position=0,
    noise=b"\x00",
    on_bad_rows="error",
)
def test_fuzzed_parquet_files(
    prompts: list[Any], responses: str, mutation: str, position: int, noise: bytes, on_bad_rows: str
) -> None:
    columns: dict[str, Any] = {"prompt": prompts}
    if responses != "missing":
        columns["response"] = [str(i) if responses == "strings" else i for i in range(len(prompts))]
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "fuzz.parquet")
        path.write_bytes(damage(buffer.getvalue(), mutation, position, noise))
        assert_read_or_clear_error(path, "instruction", on_bad_rows, rows_written=len(prompts))
