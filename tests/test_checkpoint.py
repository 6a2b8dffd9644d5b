"""Checkpoint hashing split across ranks: every file hashed once, by one rank, bytes balanced; a
corrupt file in any rank's share fails the checkpoint on every rank, and resume falls back one
checkpoint. The two ranks are real processes in a gloo group on 127.0.0.1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.backends.commands import free_port
from launcher.train.checkpoint import (
    MANIFEST,
    hash_share,
    latest_verified_checkpoint,
    seal_checkpoint,
    share_of_files,
)

SIZES = {
    "model.safetensors": 900_000,
    "optimizer.pt": 700_000,
    "rng_state_0.pth": 3000,
    "rng_state_1.pth": 3000,
}


def write_checkpoint(root: Path, step: int) -> Path:
    staged = root / f".staging-{step}" / f"checkpoint-{step}"
    for name, size in SIZES.items():
        (staged / "global_step" / name).parent.mkdir(parents=True, exist_ok=True)
        (staged / "global_step" / name).write_bytes(os.urandom(size))
    (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    hashes = {**hash_share(staged, 0, 2), **hash_share(staged, 1, 2)}
    seal_checkpoint(staged, root / f"checkpoint-{step}", step, hashes)
    return root / f"checkpoint-{step}"


def test_the_ranks_split_the_files_once_each_with_balanced_bytes(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path, 3)
    shares = [set(share_of_files(checkpoint, rank, 2)) for rank in range(2)]
    every = {
        str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST
    }
    assert shares[0] | shares[1] == every and not shares[0] & shares[1]
    sizes = [sum((checkpoint / name).stat().st_size for name in share) for share in shares]
    assert max(sizes) - min(sizes) <= max(SIZES.values()), sizes
    recorded = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert set(recorded) == every


def _rank(rank: int, port: int, root: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def gather(value: object) -> list[object]:
        out: list[object] = [None, None]
        dist.all_gather_object(out, value)
        return out

    chosen = latest_verified_checkpoint(Path(root), rank, 2, gather)
    Path(results, f"rank{rank}.json").write_text(json.dumps(str(chosen)))
    dist.destroy_process_group()


def test_a_corrupt_file_in_one_ranks_share_fails_the_checkpoint_on_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    older = write_checkpoint(root, 3)
    newest = write_checkpoint(root, 6)
    victim = share_of_files(newest, 1, 2)[0]
    data = bytearray((newest / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / victim).write_bytes(bytes(data))
    assert victim not in share_of_files(newest, 0, 2), "rank 0 alone would not see the damage"
    torch.set_num_threads(1)
    mp.start_processes(_rank, args=(free_port(), str(root), str(tmp_path)), nprocs=2, start_method="fork")
    chosen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert chosen == [str(older), str(older)], "both ranks fall back to the previous checkpoint"
