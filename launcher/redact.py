"""Secrets kept out of what Flotilla writes and prints: plan.json, spec.yaml, `plan`, `--dry-run`.

An environment variable is a secret when its name, in capitals as environment names are written,
contains TOKEN, KEY, SECRET or PASSWORD (``HF_TOKEN``, ``WANDB_API_KEY``, ``AWS_SECRET_ACCESS_KEY``).
Its value is replaced by :data:`REDACTED` wherever it is assigned: a mapping entry (Ray's
``runtime_env.env_vars``), a shell line (``export HF_TOKEN=...`` in ``slurm.setup``), a YAML or JSON
line. A reference to another variable (``$HF_TOKEN``) holds no secret and is kept. A run started
again from its run dir takes the redacted values from its own environment (:func:`restore_secrets`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from launcher.errors import FlotillaError

REDACTED = "<redacted>"
#: An environment name that holds a secret.
SECRET_NAME = re.compile(r"[A-Z0-9_]*(?:TOKEN|KEY|SECRET|PASSWORD)[A-Z0-9_]*")
#: ``NAME=value``, ``NAME: value`` or ``"NAME": "value"`` with a secret NAME (the value may be quoted).
_ASSIGNMENT = re.compile(
    r"""(?P<head>(?<![\w.-])(?P<quote>["']?)(?P<name>[A-Z0-9_]*(?:TOKEN|KEY|SECRET|PASSWORD)[A-Z0-9_]*)"""
    r"""(?P=quote)[ \t]*[:=][ \t]*)(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,;}\]"']+)"""
)


def is_secret_name(name: str) -> bool:
    """Whether the environment variable ``name`` holds a secret."""
    return SECRET_NAME.fullmatch(name) is not None


def redact_text(text: str) -> str:
    """``text`` with the value of every secret assignment replaced by :data:`REDACTED`."""

    def replace(match: re.Match[str]) -> str:
        value = match["value"]
        bare = value.strip("\"'")
        if not bare or bare.startswith("$") or bare == REDACTED:
            return match[0]
        quote = value[0] if value[0] in "\"'" else ""
        return f"{match['head']}{quote}{REDACTED}{quote}"

    return _ASSIGNMENT.sub(replace, text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like ``value`` with secret mapping entries and assignments in strings redacted."""
    if isinstance(value, dict):
        return {
            key: REDACTED
            if is_secret_name(str(key)) and isinstance(item, str | int | float) and item != ""
            else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def restore_secrets(env_vars: dict[str, Any], where: str) -> dict[str, Any]:
    """``env_vars`` with each redacted value taken from this process's environment.

    A run dir's plan.json keeps no secret; a run resumed from it needs the value again. ``where``
    names the mapping for the error (``ray.runtime_env.env_vars``).
    """
    missing = [name for name, value in env_vars.items() if value == REDACTED and name not in os.environ]
    if missing:
        raise FlotillaError(
            f"{where}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} redacted in the run's "
            "plan.json (secrets are never written there); export "
            f"{' and '.join(missing)} in this shell to resume the run"
        )
    return {name: os.environ[name] if value == REDACTED else value for name, value in env_vars.items()}
