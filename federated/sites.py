"""The sites a server knows: enrollments (node id, site name, key fingerprint), revocations, and
waiting for sites to connect."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.atomic import write_json_atomic

#: node id -> the site (the enrolled key's file name) and its key's fingerprint, kept in the work
#: dir across server restarts (the SuperLink's database keeps the enrollments too).
SITE_NAMES_FILE = "enrolled-sites.json"
#: Sites whose enrollment was revoked (``flotilla fed revoke``): never enrolled again by this server.
REVOKED_FILE = "revoked-sites.json"


@dataclass(frozen=True)
class Enrollment:
    """A SuperNode key registered with the SuperLink."""

    site: str
    key: str | None  # sha256 of the public key (None: recorded before fingerprints were kept)


def key_fingerprint(public_key: Path) -> str:
    """sha256 of an OpenSSH public key (its type and key material, not the comment)."""
    kind, material, *_ = public_key.read_text(encoding="utf-8").split()
    return hashlib.sha256(f"{kind} {material}".encode()).hexdigest()


def enrollments(work_dir: Path) -> dict[int, Enrollment]:
    """Every enrollment this server recorded, by node id."""
    path = work_dir / SITE_NAMES_FILE
    raw = json.loads(path.read_text()) if path.is_file() else {}
    return {
        int(node): Enrollment(value, None)
        if isinstance(value, str)
        else Enrollment(value["site"], value["key"])
        for node, value in raw.items()
    }


def remember_enrollment(work_dir: Path, node: int, site: str, key: str) -> None:
    """Record that ``node`` is ``site``'s key ``key``."""
    _write_enrollments(work_dir, {**enrollments(work_dir), node: Enrollment(site, key)})


def forget_enrollment(work_dir: Path, node: int) -> None:
    """Drop ``node`` from the record (after it was unregistered)."""
    _write_enrollments(work_dir, {n: e for n, e in enrollments(work_dir).items() if n != node})


def site_names(work_dir: Path) -> dict[int, str]:
    """The site names of the nodes enrolled by ``flotilla fed server`` (empty in simulation)."""
    revoked = revoked_sites(work_dir)
    return {node: e.site for node, e in enrollments(work_dir).items() if e.site not in revoked}


def revoke_site(work_dir: Path, site: str) -> None:
    """Mark ``site`` revoked: the server unregisters its key and never enrolls it again."""
    write_json_atomic(work_dir / REVOKED_FILE, sorted(revoked_sites(work_dir) | {site}))


def revoked_sites(work_dir: Path) -> set[str]:
    path = work_dir / REVOKED_FILE
    return set(json.loads(path.read_text())) if path.is_file() else set()


def wait_for_sites(connected: Callable[[], int], wanted: int, timeout: float) -> int:
    """Poll ``connected`` once a second until ``wanted`` sites are there or ``timeout`` s passed;
    the number connected at the end."""
    deadline = time.time() + timeout
    while (count := connected()) < wanted and time.time() < deadline:
        time.sleep(1.0)
    return count


def _write_enrollments(work_dir: Path, records: dict[int, Enrollment]) -> None:
    write_json_atomic(
        work_dir / SITE_NAMES_FILE, {str(n): {"site": e.site, "key": e.key} for n, e in records.items()}
    )
