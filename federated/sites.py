"""The sites a server knows: the names enrolled with their node keys, and waiting for them to connect."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from launcher.atomic import write_json_atomic

#: node id -> site name (the enrolled key's file name), kept in the work dir across server restarts.
SITE_NAMES_FILE = "enrolled-sites.json"


def remember_site_names(work_dir: Path, names: dict[int, str]) -> None:
    """Add ``names`` (node id -> site) to the work dir's record of enrolled sites."""
    write_json_atomic(
        work_dir / SITE_NAMES_FILE, {str(k): v for k, v in {**site_names(work_dir), **names}.items()}
    )


def site_names(work_dir: Path) -> dict[int, str]:
    """The site names of the nodes enrolled by ``flotilla fed server`` (empty in simulation)."""
    path = work_dir / SITE_NAMES_FILE
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def wait_for_sites(connected: Callable[[], int], wanted: int, timeout: float) -> int:
    """Poll ``connected`` once a second until ``wanted`` sites are there or ``timeout`` s passed;
    the number connected at the end."""
    deadline = time.time() + timeout
    while (count := connected()) < wanted and time.time() < deadline:
        time.sleep(1.0)
    return count
