"""The prepared-data cache: one folder per (data files, tokenizer, data keys, seed), built once.

The first process to take the key's file lock prepares the data into a staging folder and publishes
it by rename; every other process (the other ranks of the node, or of every node on shared storage;
a resumed, requeued or restarted run) waits on the lock and then memory-maps the published folder.
A changed file (its sha256), tokenizer (vocabulary, merges, chat template, special tokens) or data key
is a different key, so a stale folder is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from launcher.hashing import sha256_file
from launcher.spec import DataSpec

#: Bumped whenever the pipeline's output for the same inputs changes.
PIPELINE_VERSION = 1
#: Data keys that change how batches are drawn, not the prepared rows.
BATCHING_KEYS = {"packing", "group_by_length", "cache_dir", "num_proc"}
DONE = "prepared.json"


def cache_root(spec: DataSpec, output_dir: str | Path) -> Path:
    """``data.cache_dir``, else ``$FLOTILLA_CACHE/data``, else ``<output dir>/.flotilla-cache/data``."""
    if spec.cache_dir:
        return Path(spec.cache_dir)
    if os.environ.get("FLOTILLA_CACHE"):
        return Path(os.environ["FLOTILLA_CACHE"]) / "data"
    return Path(output_dir) / ".flotilla-cache" / "data"


def file_fingerprint(path: str) -> str:
    """sha256 of a local data file (or the name, for a hub dataset)."""
    file = Path(path)
    return sha256_file(file) if file.is_file() else f"hub:{path}"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What of a tokenizer decides the token ids and masks: its model, template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = {
        "class": type(tokenizer).__name__,
        "model": backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        "chat_template": tokenizer.chat_template,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def cache_key(
    spec: DataSpec,
    fingerprints: dict[str, str],
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    labels: list[str] | None,
) -> str:
    """The folder name for these inputs."""
    described = {
        "version": PIPELINE_VERSION,
        "spec": spec.model_dump(mode="json", exclude=BATCHING_KEYS),
        "files": fingerprints,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seed": seed,
        "labels": labels,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def prepared_folder(folder: Path, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """``folder``, built by ``build(staging folder)`` unless already published; True if built here."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / DONE).is_file():
            return folder, False
        staging = folder.with_name(f"{folder.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)  # a folder without its DONE marker is incomplete
        staging.mkdir()
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.rename(folder)
    return folder, True
