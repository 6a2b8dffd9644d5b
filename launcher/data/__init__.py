"""A job's data: read (JSONL, CSV, Parquet, hub), checked, split, mixed and tokenized, with its report.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.data.cache import cache_root
from launcher.data.encode import IGNORE_INDEX
from launcher.data.prepare import PreparedData, prepare_data

__all__ = [
    "IGNORE_INDEX",
    "PreparedData",
    "cache_root",
    "prepare_data",
]
