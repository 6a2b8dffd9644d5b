"""Fingerprints a site pins in its policy: the base model it trains and the code it runs.

The code fingerprint is one sha256 over Flotilla's own sources (every ``.py`` file of ``launcher`` and
``federated`` as installed) and the versions of the libraries that train and aggregate. Flower's app
bundle carries no code (``fab-include`` is the README only), so this installation is all a site runs.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import federated
import launcher
from launcher.hashing import digest_of, sha256_file
from launcher.spec import ModelSpec

#: Libraries whose version is part of the code fingerprint.
PINNED_LIBRARIES = ("flwr", "torch", "transformers", "peft", "safetensors", "numpy", "datasets")


def code_sha256() -> str:
    """sha256 over Flotilla's sources and the pinned libraries' versions, as installed here."""
    hashes: dict[str, str] = {}
    for package in (launcher, federated):
        root = Path(package.__file__).parent
        for source in sorted(root.rglob("*.py")):
            hashes[f"{package.__name__}/{source.relative_to(root)}"] = sha256_file(source)
    for library in PINNED_LIBRARIES:
        hashes[f"version:{library}"] = metadata.version(library)
    return digest_of(hashes)


def base_model_sha256(model: ModelSpec) -> str:
    """The fingerprint of a spec's (local) base model."""
    # launcher.model imports torch and transformers: every `flotilla` command would load them
    # (8 s) through the `fed` plugin's import of this module, most of which never fingerprint
    from launcher.model import model_sha256

    return model_sha256(model.path, model.gguf_file)
