"""Datasets for a job: read, check, split, mix and tokenize; the data report comes from here."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from launcher.atomic import write_json_atomic
from launcher.data.cache import DONE, cache_key, file_fingerprint, prepared_folder
from launcher.data.encode import encode_batch
from launcher.data.read import SourceReader
from launcher.data.report import DataReport, SourceReport, length_percentiles
from launcher.data.stage import StagedSource, first_occurrences, stage_rows
from launcher.errors import DataError
from launcher.spec import DataSource, DataSpec

TRAIN_PROBE_ROWS = 64
ENCODE_BATCH_ROWS = 1000
#: Below this many rows one process tokenizes faster than starting workers would.
PARALLEL_FROM_ROWS = 20_000


@dataclass
class PreparedData:
    """Tokenized splits ready for the Trainer, plus the report that describes them."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    train_probe: datasets.Dataset
    labels: list[str] | None
    report: DataReport
    fingerprints: dict[str, str] = field(default_factory=dict)
    cache_folder: Path | None = None


def reader(spec: DataSpec, source: DataSource) -> SourceReader:
    """The rows of one source with the spec's defaults for format and field names."""
    return SourceReader(
        source.path,
        source.format or spec.format,
        source.fields or spec.fields,
        spec.on_bad_rows,
        source.split,
    )


def prepare_data(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    cache_root: Path,
    labels: list[str] | None = None,
    console: Callable[[str], None] | None = None,
) -> PreparedData:
    """Everything the train core needs from ``spec.data`` (``labels`` fixes the label order), read
    from the cache under ``cache_root`` or prepared there first (by one process; the others wait)."""
    fingerprints = {s.path: file_fingerprint(s.path) for s in [*spec.train, *spec.validation]}
    folder = cache_root / cache_key(spec, fingerprints, tokenizer, seed, labels)
    started = time.perf_counter()
    with _quiet_datasets():
        folder, built = prepared_folder(
            folder, lambda stage: _build(spec, tokenizer, seed, labels, fingerprints, stage)
        )
    data = _load(folder)
    if console is not None:
        verb = "prepared" if built else "reused"
        console(f"data: {verb} in {time.perf_counter() - started:.1f} s ({folder})")
    return data


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No per-step progress bars from datasets on the job's console (the data step reports once)."""
    was_enabled = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load(folder: Path) -> PreparedData:
    """The published cache folder, memory-mapped."""
    try:
        meta = json.loads((folder / DONE).read_text(encoding="utf-8"))
        train = datasets.load_from_disk(str(folder / "train"))
        validation = datasets.load_from_disk(str(folder / "validation")) if meta["validation"] else None
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"{folder}: the prepared-data cache is unreadable ({exc}); delete the folder"
        ) from None
    report = DataReport.from_dict(meta["report"])
    probe = train.select(range(min(TRAIN_PROBE_ROWS, len(train))))
    return PreparedData(train, validation, probe, meta["labels"], report, meta["fingerprints"], folder)


def _build(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    labels: list[str] | None,
    fingerprints: dict[str, str],
    stage: Path,
) -> None:
    """Read, check, split, tokenize and mix into ``stage``; its marker file is written last."""
    scratch = stage / "scratch"
    scratch.mkdir()
    report = DataReport()
    rng = random.Random(seed)
    train_parts: list[Part] = []
    validation_parts: list[Part] = []
    for index, source in enumerate(spec.train):
        part = _clean(spec, source, scratch / f"train-{index}.arrow", report, "train")
        if spec.shuffle:
            order = list(range(len(part.rows)))
            rng.shuffle(order)
            part.rows = part.rows[order]
        if not spec.validation and spec.validation_ratio > 0:
            n = len(part.rows)
            cut = max(1, round(n * spec.validation_ratio)) if n > 1 else 0
            validation_parts.append(Part(part.staged, part.dataset, part.rows[:cut]))
            part.rows = part.rows[cut:]
        train_parts.append(part)
    for index, source in enumerate(spec.validation):
        validation_parts.append(
            _clean(spec, source, scratch / f"validation-{index}.arrow", report, "validation")
        )
    report.leaked_rows = _count_leakage(train_parts, validation_parts)
    found = _label_names([*train_parts, *validation_parts])
    labels = labels if labels is not None else spec.labels
    if labels is not None and found and set(found) - set(labels):
        raise DataError(
            f"labels {sorted(set(found) - set(labels))} in the data are not among the declared labels "
            f"{labels} (data.labels, or the trained model's labels)"
        )
    labels = labels or found
    label_ids = {name: i for i, name in enumerate(labels)} if labels else None
    report.label_balance = _label_balance(train_parts) if labels else {}
    workers = _workers(spec, sum(len(p.rows) for p in [*train_parts, *validation_parts]))

    def tokenize(parts: list[Part], name: str) -> datasets.Dataset:
        return _tokenize(parts, tokenizer, spec, label_ids, report, workers, scratch / name)

    train = _mix(
        [tokenize([p], f"train-{i}") for i, p in enumerate(train_parts)], [s.weight for s in spec.train], seed
    )
    if spec.max_train_rows:
        train = train.select(range(min(spec.max_train_rows, len(train))))
    validation = tokenize(validation_parts, "validation") if validation_parts else None
    if validation is not None and spec.max_validation_rows:
        validation = validation.select(range(min(spec.max_validation_rows, len(validation))))
    report.train_rows = len(train)
    report.validation_rows = len(validation) if validation is not None else 0
    report.token_length_percentiles = length_percentiles(_column(train, "full_length"))
    train.save_to_disk(str(stage / "train"))
    if validation is not None:
        validation.save_to_disk(str(stage / "validation"))
    shutil.rmtree(scratch)
    meta = {"labels": labels, "report": report.to_dict(), "fingerprints": fingerprints}
    write_json_atomic(stage / DONE, {**meta, "validation": report.validation_rows > 0})


@dataclass
class Part:
    """Rows of one staged source, as indices into it (kept, shuffled, split)."""

    staged: StagedSource
    dataset: datasets.Dataset
    rows: np.ndarray


def _clean(spec: DataSpec, source: DataSource, arrow_file: Path, report: DataReport, split: str) -> Part:
    """Stage a source, then drop empty rows and (if asked) exact duplicates, counting both."""
    rows = reader(spec, source)
    staged = stage_rows(rows, source.format or spec.format, arrow_file)
    nonempty = np.flatnonzero(~staged.empty)
    kept = first_occurrences(staged.row_keys, nonempty) if spec.dedup else nonempty
    source_report = SourceReport(path=source.path, split=split, rows_read=rows.rows_read)
    source_report.bad_rows = rows.bad_rows
    source_report.bad_row_examples = rows.bad_row_examples
    source_report.empty_rows = len(staged) - len(nonempty)
    source_report.duplicates_removed = len(nonempty) - len(kept)
    if not len(kept):
        raise DataError(f"{source.path}: every row is empty or a duplicate")
    source_report.rows_kept = len(kept)
    report.sources.append(source_report)
    return Part(staged, datasets.Dataset.from_file(str(arrow_file)), kept)


def _count_leakage(train_parts: list[Part], validation_parts: list[Part]) -> int:
    """Validation rows whose text also appears in the training data (exact match, by digest)."""
    train_keys = np.concatenate([p.staged.text_keys[p.rows] for p in train_parts])
    validation_keys = [p.staged.text_keys[p.rows] for p in validation_parts]
    if not validation_keys:
        return 0
    return int(np.isin(np.concatenate(validation_keys), train_keys).sum())


def _labels_of(part: Part) -> pa.ChunkedArray | None:
    if "label" not in part.dataset.column_names:
        return None
    return part.dataset.data.column("label").take(pa.array(part.rows))


def _label_names(parts: list[Part]) -> list[str] | None:
    names: set[str] = set()
    for part in parts:
        column = _labels_of(part)
        if column is not None:
            names |= set(pc.unique(column).to_pylist())
    if not names:
        return None
    return sorted(
        names, key=lambda n: (not n.lstrip("-").isdigit(), int(n) if n.lstrip("-").isdigit() else 0, n)
    )


def _label_balance(train_parts: list[Part]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in train_parts:
        column = _labels_of(part)
        for item in pc.value_counts(column).to_pylist() if column is not None else []:
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return dict(sorted(counts.items()))


def _workers(spec: DataSpec, rows: int) -> int:
    """``data.num_proc``, else one process per core (at most 8) once there are enough rows to pay
    for starting them."""
    if spec.num_proc:
        return spec.num_proc
    return 1 if rows < PARALLEL_FROM_ROWS else max(1, min(8, len(os.sched_getaffinity(0))))


def _tokenize(
    parts: list[Part],
    tokenizer: PreTrainedTokenizerBase,
    spec: DataSpec,
    label_ids: dict[str, int] | None,
    report: DataReport,
    workers: int,
    cache_file: Path,
) -> datasets.Dataset:
    """Encode the parts' rows in batches (``workers`` processes), then drop what the checks drop."""
    encoded = datasets.concatenate_datasets(
        [
            _encode(part.dataset.select(part.rows), tokenizer, spec, label_ids, workers, cache_file, index)
            for index, part in enumerate(parts)
        ]
    )
    overlong = _column(encoded, "overlong").astype(bool)
    no_target = _column(encoded, "no_target").astype(bool)
    dropped = overlong & spec.drop_overlong
    report.overlong_rows += int(overlong.sum())
    report.no_target_rows += int((no_target & ~dropped).sum())
    keep = np.flatnonzero(~dropped & ~no_target)
    if not len(keep):
        raise DataError("no rows left after tokenization (all overlong or without a target)")
    return encoded.remove_columns(["overlong", "no_target"]).select(keep)


def _encode(
    rows: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    spec: DataSpec,
    label_ids: dict[str, int] | None,
    workers: int,
    cache_file: Path,
    index: int,
) -> datasets.Dataset:
    name = f"encoded-{cache_file.name}-{index}"
    return rows.map(
        encode_batch,
        batched=True,
        batch_size=ENCODE_BATCH_ROWS,
        num_proc=workers if 1 < workers <= len(rows) else None,
        remove_columns=rows.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": spec.max_length, "label_ids": label_ids},
        cache_file_name=str(cache_file.with_name(f"{name}.arrow")),
        new_fingerprint=name,
        desc=f"tokenize {name}",
    )


def _column(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """One scalar column as numpy, through the dataset's row order (its indices mapping, if any)."""
    return np.asarray(dataset.with_format("numpy")[name])


def _mix(parts: list[datasets.Dataset], weights: list[float], seed: int) -> datasets.Dataset:
    """One source as is; several interleaved with probabilities proportional to their weights."""
    if len(parts) == 1:
        return parts[0]
    total = sum(weights)
    return datasets.interleave_datasets(
        parts,
        probabilities=[w / total for w in weights],
        seed=seed,
        stopping_strategy="all_exhausted",
    )
