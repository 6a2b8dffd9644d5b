"""Resolve ``model.path`` (alias, directory, GGUF file or hub id) to something transformers loads.

GGUF files are de-quantized by transformers on every load, which is slow; the first load writes a
safetensors copy into a cache (atomically) and later loads read that copy.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import FlotillaError
from launcher.hashing import digest_of, folder_hashes, sha256_file
from launcher.model.assets import BUNDLED_MODELS, resolve_alias


@dataclass(frozen=True)
class ModelSource:
    """Arguments for ``from_pretrained``: a directory or hub id, and a GGUF file name if any."""

    name_or_path: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        """Whether the model is on this machine (no hub needed)."""
        return Path(self.name_or_path).is_dir()


def resolve_model_source(path: str, gguf_file: str | None = None) -> ModelSource:
    """Turn the spec's ``model.path`` into a :class:`ModelSource`."""
    if path in BUNDLED_MODELS:
        folder, bundled_gguf = resolve_alias(path)
        return ModelSource(str(folder), gguf_file or bundled_gguf)
    candidate = Path(path).expanduser()
    if candidate.suffix == ".gguf":
        if not candidate.is_file():
            raise FlotillaError(f"model.path: GGUF file {path} does not exist")
        return ModelSource(str(candidate.parent.resolve()), candidate.name)
    if candidate.is_dir():
        if gguf_file and not (candidate / gguf_file).is_file():
            raise FlotillaError(f"model.gguf_file: {gguf_file} is not in {candidate}")
        return ModelSource(str(candidate.resolve()), gguf_file)
    if candidate.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FlotillaError(
            f"model.path: {path!r} is neither a model directory, a .gguf file, a bundled alias "
            f"({', '.join(BUNDLED_MODELS)}) nor a hub id"
        )
    return ModelSource(path, gguf_file)


def hub_hint(source: ModelSource) -> str:
    """Why a hub model may have failed to load here."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f"model {source.name_or_path!r} is not a local directory, so it must come from the "
        f"Hugging Face hub{' (HF_HUB_OFFLINE=1 is set)' if offline else ''}; without a network use a "
        f"local directory, a .gguf file or a bundled alias ({', '.join(BUNDLED_MODELS)})"
    )


def gguf_cache_dir(source: ModelSource) -> Path:
    """Where the safetensors copy of a GGUF model is cached."""
    gguf = Path(source.name_or_path) / (source.gguf_file or "")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    root = Path(os.environ.get("FLOTILLA_CACHE", Path.home() / ".cache" / "flotilla"))
    return root / "gguf" / f"{gguf.stem}-{key[:16]}"


def model_sha256(path: str, gguf_file: str | None = None) -> str:
    """The fingerprint of a local model: sha256 of its GGUF file, or one sha256 over every file of
    its directory (names and contents). A hub id has no local bytes to fingerprint: an error."""
    source = resolve_model_source(path, gguf_file)
    if not source.is_local:
        raise FlotillaError(f"model.path: {path!r} is a hub id; only a local model can be fingerprinted")
    folder = Path(source.name_or_path)
    if source.gguf_file:
        return sha256_file(folder / source.gguf_file)
    return digest_of(folder_hashes(folder))
