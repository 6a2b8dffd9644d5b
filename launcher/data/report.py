"""The data report: what the checks found, written before training and printed briefly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class SourceReport:
    """Counts for one data source."""

    path: str
    split: str
    rows_read: int = 0
    rows_kept: int = 0
    bad_rows: int = 0
    empty_rows: int = 0
    duplicates_removed: int = 0
    bad_row_examples: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    """Checks over all sources of a job."""

    sources: list[SourceReport] = field(default_factory=list)
    train_rows: int = 0
    validation_rows: int = 0
    overlong_rows: int = 0
    no_target_rows: int = 0
    leaked_rows: int = 0
    label_balance: dict[str, int] = field(default_factory=dict)
    token_length_percentiles: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> DataReport:
        """The report ``to_dict`` wrote."""
        sources = [SourceReport(**source) for source in payload["sources"]]
        return cls(**{**payload, "sources": sources})

    def warnings(self) -> list[str]:
        """Findings that deserve the user's attention."""
        found = []
        if self.leaked_rows:
            found.append(f"{self.leaked_rows} validation rows also appear in the training data")
        if self.overlong_rows:
            found.append(f"{self.overlong_rows} rows exceed data.max_length and were truncated or dropped")
        if self.label_balance:
            counts = list(self.label_balance.values())
            if max(counts) > 4 * max(min(counts), 1):
                found.append(f"labels are imbalanced: {self.label_balance}")
        for source in self.sources:
            if source.bad_rows:
                found.append(f"{source.path}: skipped {source.bad_rows} bad rows")
        return found

    def _percentiles(self) -> list[int]:
        found = self.token_length_percentiles
        return [found[key] for key in ("p50", "p90", "p99", "max") if key in found]

    def summary_lines(self) -> list[str]:
        """A few lines for the console."""
        lines = [
            f"train rows {self.train_rows}, validation rows {self.validation_rows}, "
            f"token length p50/p90/p99/max {'/'.join(str(v) for v in self._percentiles())}"
        ]
        for source in self.sources:
            lines.append(
                f"{source.split:<10} {source.path}: read {source.rows_read}, kept {source.rows_kept}, "
                f"duplicates {source.duplicates_removed}, empty {source.empty_rows}, bad {source.bad_rows}"
            )
        if self.label_balance:
            lines.append(f"label balance {self.label_balance}")
        lines.append(
            f"overlong {self.overlong_rows}, train/validation overlap {self.leaked_rows}, "
            f"rows without a target {self.no_target_rows}"
        )
        return lines


def length_percentiles(lengths: Sequence[int] | np.ndarray) -> dict[str, int]:
    """p50, p90, p99 and max of token lengths."""
    values = np.asarray(lengths)
    return {
        "p50": int(np.percentile(values, 50)),
        "p90": int(np.percentile(values, 90)),
        "p99": int(np.percentile(values, 99)),
        "max": int(values.max()),
    }
