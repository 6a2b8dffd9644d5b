"""Datasets for a job: read, check, split, mix and tokenize; the data report comes from here."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from launcher.data.encode import encode_row, row_text
from launcher.data.read import LoadedRows, read_source
from launcher.data.report import DataReport, SourceReport, length_percentiles
from launcher.errors import DataError
from launcher.hashing import sha256_file
from launcher.spec import DataSource, DataSpec

TRAIN_PROBE_ROWS = 64


@dataclass
class PreparedData:
    """Tokenized splits ready for the Trainer, plus the report that describes them."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    train_probe: datasets.Dataset
    labels: list[str] | None
    report: DataReport
    fingerprints: dict[str, str] = field(default_factory=dict)


def read_rows(spec: DataSpec, source: DataSource) -> LoadedRows:
    """Rows of one source with the spec's defaults for format and field names."""
    return read_source(
        source.path,
        source.format or spec.format,
        source.fields or spec.fields,
        spec.on_bad_rows,
        source.split,
    )


def prepare_data(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, labels: list[str] | None = None
) -> PreparedData:
    """Everything the train core needs from ``spec.data`` (``labels`` fixes the label order)."""
    report = DataReport()
    rng = random.Random(seed)
    train_parts: list[list[dict[str, Any]]] = []
    validation_rows: list[dict[str, Any]] = []
    for source in spec.train:
        rows = _clean(read_rows(spec, source), spec, report, "train")
        rng.shuffle(rows)
        if not spec.validation and spec.validation_ratio > 0:
            cut = max(1, round(len(rows) * spec.validation_ratio)) if len(rows) > 1 else 0
            validation_rows += rows[:cut]
            rows = rows[cut:]
        train_parts.append(rows)
    for source in spec.validation:
        validation_rows += _clean(read_rows(spec, source), spec, report, "validation")
    report.leaked_rows = _count_leakage(train_parts, validation_rows)
    found = _label_names(train_parts, validation_rows)
    labels = labels if labels is not None else spec.labels
    if labels is not None and found and set(found) - set(labels):
        raise DataError(
            f"labels {sorted(set(found) - set(labels))} in the data are not among the declared labels "
            f"{labels} (data.labels, or the trained model's labels)"
        )
    labels = labels or found
    label_ids = {name: i for i, name in enumerate(labels)} if labels else None
    report.label_balance = _label_balance(train_parts) if labels else {}
    train = _mix(
        [_tokenize(p, tokenizer, spec, label_ids, report) for p in train_parts],
        [s.weight for s in spec.train],
        seed,
    )
    if spec.max_train_rows:
        train = train.select(range(min(spec.max_train_rows, len(train))))
    validation = None
    if validation_rows:
        validation = _tokenize(validation_rows, tokenizer, spec, label_ids, report)
        if spec.max_validation_rows:
            validation = validation.select(range(min(spec.max_validation_rows, len(validation))))
    report.train_rows = len(train)
    report.validation_rows = len(validation) if validation is not None else 0
    report.token_length_percentiles = length_percentiles(train["full_length"])
    probe = train.select(range(min(TRAIN_PROBE_ROWS, len(train))))
    fingerprints = {s.path: fingerprint(s.path) for s in [*spec.train, *spec.validation]}
    return PreparedData(train, validation, probe, labels, report, fingerprints)


def _clean(loaded: LoadedRows, spec: DataSpec, report: DataReport, split: str) -> list[dict[str, Any]]:
    """Drop empty rows and (if asked) exact duplicates, recording counts per source."""
    source_report = SourceReport(path=loaded.source, split=split, rows_read=len(loaded.rows))
    source_report.bad_rows = len(loaded.bad_rows)
    source_report.bad_row_examples = loaded.bad_rows[:5]
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in loaded.rows:
        text = row_text(row)
        if not text.strip() or (("response" in row) and not row["response"].strip()):
            source_report.empty_rows += 1
            continue
        key = _row_key(row)
        if spec.dedup and key in seen:
            source_report.duplicates_removed += 1
            continue
        seen.add(key)
        kept.append(row)
    if not kept:
        raise DataError(f"{loaded.source}: every row is empty or a duplicate")
    source_report.rows_kept = len(kept)
    report.sources.append(source_report)
    return kept


def _row_key(row: dict[str, Any]) -> str:
    return hashlib.sha1(repr(sorted(row.items())).encode()).hexdigest()


def _count_leakage(train_parts: list[list[dict[str, Any]]], validation: list[dict[str, Any]]) -> int:
    """Validation rows whose text also appears in the training data (exact match)."""
    train_texts = {row_text(row).strip() for part in train_parts for row in part}
    return sum(row_text(row).strip() in train_texts for row in validation)


def _label_names(
    train_parts: list[list[dict[str, Any]]], validation: list[dict[str, Any]]
) -> list[str] | None:
    names = {row["label"] for part in train_parts for row in part if "label" in row}
    names |= {row["label"] for row in validation if "label" in row}
    if not names:
        return None
    return sorted(
        names, key=lambda n: (not n.lstrip("-").isdigit(), int(n) if n.lstrip("-").isdigit() else 0, n)
    )


def _label_balance(train_parts: list[list[dict[str, Any]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in train_parts:
        for row in part:
            counts[row["label"]] = counts.get(row["label"], 0) + 1
    return dict(sorted(counts.items()))


def _tokenize(
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    spec: DataSpec,
    label_ids: dict[str, int] | None,
    report: DataReport,
) -> datasets.Dataset:
    encoded = []
    for row in rows:
        item = encode_row(row, tokenizer, spec.max_length, label_ids)
        if item["full_length"] > spec.max_length:
            report.overlong_rows += 1
            if spec.drop_overlong:
                continue
        if isinstance(item["labels"], list) and all(t == -100 for t in item["labels"]):
            report.no_target_rows += 1
            continue
        item["length"] = len(item["input_ids"])
        encoded.append(item)
    if not encoded:
        raise DataError("no rows left after tokenization (all overlong or without a target)")
    return datasets.Dataset.from_list(encoded)


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


def fingerprint(path: str) -> str:
    """sha256 of a local data file (or the name, for a hub dataset)."""
    file = Path(path)
    return sha256_file(file) if file.is_file() else f"hub:{path}"
