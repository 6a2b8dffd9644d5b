"""sha256 of files and folders, read in chunks (checkpoint manifests, data and model fingerprints)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_hashes(folder: Path, exclude: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (files named in ``exclude`` left out)."""
    skipped = set(exclude)
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in skipped
    }


def digest_of(hashes: dict[str, str]) -> str:
    """One sha256 over named hashes (a folder's, or a set of files'), independent of dict order."""
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(f"{name}\0{hashes[name]}\n".encode())
    return digest.hexdigest()
