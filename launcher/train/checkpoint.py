"""Checkpoints and adapters: published atomically, with a manifest of hashes, verified before use."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from launcher.atomic import publish_dir, staging_dir, write_json_atomic
from launcher.errors import CheckpointError
from launcher.hashing import folder_hashes, sha256_file

MANIFEST = "flotilla-checkpoint.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


#: Every rank's part of a collective: its own value in, all ranks' values out (rank order).
Gather = Callable[[Any], list[Any]]


def alone(value: Any) -> list[Any]:
    """The gather of a single process."""
    return [value]


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the manifest itself excluded)."""
    return folder_hashes(folder, exclude=[MANIFEST])


def share_of_files(folder: Path, rank: int, world: int) -> list[str]:
    """This rank's files of ``folder`` (relative paths): largest first, each to the rank with the
    fewest bytes so far, so every rank hashes about 1/world of the bytes. Every rank computes the
    same split from the same listing, without talking to the others."""
    files = sorted(
        ((p.stat().st_size, str(p.relative_to(folder))) for p in folder.rglob("*") if p.is_file()),
        key=lambda item: (-item[0], item[1]),
    )
    load = [0] * world
    mine = []
    for size, name in files:
        if name == MANIFEST:
            continue
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += size
        if owner == rank:
            mine.append(name)
    return mine


def hash_share(folder: Path, rank: int, world: int) -> dict[str, str]:
    """sha256 of this rank's share of the files under ``folder``."""
    return {name: sha256_file(folder / name) for name in share_of_files(folder, rank, world)}


def seal_checkpoint(staged: Path, final: Path, step: int, hashes: dict[str, str]) -> None:
    """Write the manifest (``hashes`` of every file) into a fully written checkpoint, then publish
    it with one rename."""
    write_json_atomic(staged / MANIFEST, {"step": step, "files": hashes})
    if final.exists():
        shutil.rmtree(final)
    publish_dir(staged, final)


def is_verified(checkpoint: Path, rank: int = 0, world: int = 1, gather: Gather = alone) -> bool:
    """True if the checkpoint has a manifest and every file still matches its hash; with several
    ranks each checks its share of the files and all must agree (``gather`` is the collective)."""
    manifest = checkpoint / MANIFEST
    recorded: dict[str, str] = {}
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError):
            recorded = {}
    listed = set(share_of_files(checkpoint, rank, world))
    mine = bool(recorded) and all(
        name in recorded and sha256_file(checkpoint / name) == recorded[name] for name in listed
    )
    everyone = gather((mine, sorted(listed)))
    checked = {name for _, names in everyone for name in names}
    return all(ok for ok, _ in everyone) and checked == set(recorded)


def checkpoints_by_step(root: Path) -> list[tuple[int, Path]]:
    """Published checkpoints under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def latest_verified_checkpoint(
    root: Path, rank: int = 0, world: int = 1, gather: Gather = alone
) -> Path | None:
    """The newest checkpoint that passes verification: only the newest is hashed unless it fails,
    then the next one (corrupt ones are skipped); the ranks split the hashing."""
    for _, path in checkpoints_by_step(root):
        if is_verified(path, rank, world, gather):
            return path
    return None


def rotate_checkpoints(root: Path, keep: int, also: Path | None = None) -> None:
    """Keep the newest ``keep`` checkpoints, and ``also`` (the best one, under early stopping)."""
    for _, path in checkpoints_by_step(root)[keep:]:
        if also is None or path.resolve() != also.resolve():
            shutil.rmtree(path, ignore_errors=True)


def save_verified(
    save: Callable[[Path], None], expected: dict[str, torch.Tensor], weights_file: str, final: Path
) -> None:
    """Run ``save(folder)`` into a staging folder, check the written tensors equal ``expected``,
    then publish the folder at ``final``. A mismatch raises :class:`CheckpointError`."""
    staged = staging_dir(final)
    try:
        save(staged)
        verify_tensors(staged / weights_file, expected)
        write_json_atomic(staged / MANIFEST, {"files": file_hashes(staged)})
        if final.exists():
            shutil.rmtree(final)
        publish_dir(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def verify_tensors(weights: Path, expected: dict[str, torch.Tensor]) -> None:
    """Reload ``weights`` and compare with ``expected``: same keys, non-empty, equal values."""
    if not weights.is_file():
        raise CheckpointError(f"save verification failed: {weights} was not written")
    written = load_file(str(weights))
    if not expected:
        raise CheckpointError("save verification failed: nothing to save (no trainable tensors)")
    missing = sorted(set(expected) - set(written))
    if missing:
        raise CheckpointError(f"save verification failed: {len(missing)} tensors missing, e.g. {missing[0]}")
    for key, tensor in expected.items():
        saved = written[key]
        if saved.numel() == 0 or saved.shape != tensor.shape:
            raise CheckpointError(
                f"save verification failed: {key} saved with shape {tuple(saved.shape)}, "
                f"expected {tuple(tensor.shape)} (an empty tensor means a partitioned parameter was "
                "not gathered before saving)"
            )
        if not torch.equal(saved.to(tensor.dtype), tensor.detach().cpu()):
            raise CheckpointError(f"save verification failed: {key} differs from the in-memory tensor")
