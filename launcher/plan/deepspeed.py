"""The DeepSpeed config, derived from the spec: no ``auto`` left, no value set in two places.

Every key Flotilla derives comes from one spec key (:data:`DERIVED_FROM`); ``resources.deepspeed_overrides``
may add anything else DeepSpeed reads, is checked against DeepSpeed's own config parser (its pydantic
models in ``deepspeed.runtime.zero.config``, ``deepspeed.runtime.precision_config``...), and may not
contradict a derived value.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from launcher.errors import SpecError
from launcher.plan.layout import Layout, job_layout
from launcher.spec import JobSpec, zero_problems

OVERRIDES = "resources.deepspeed_overrides"

#: Derived keys (dotted DeepSpeed paths) and the spec key each one comes from.
DERIVED_FROM = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (÷ micro_batch_size × processes)",
    "train_batch_size": "train.global_batch_size",
    "gradient_clipping": "train.max_grad_norm",
    "bf16.enabled": "resources.precision",
    "fp16.enabled": "resources.precision",
    "zero_optimization.stage": "resources.zero.stage",
    "zero_optimization.offload_optimizer.device": "resources.zero.offload_optimizer",
    "zero_optimization.offload_param.device": "resources.zero.offload_params",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": (
        "Flotilla's verified saves (ZeRO-3 weights are gathered before saving)"
    ),
    "zero_force_ds_cpu_optimizer": "train.optimizer (the Trainer's optimizer is used, offload included)",
}
#: Sections that belong to the Trainer: setting them in DeepSpeed would configure a second optimizer.
TRAINER_OWNED = {
    "optimizer": "train.optimizer, train.learning_rate and train.weight_decay",
    "scheduler": "train.scheduler, train.warmup_ratio and train.warmup_steps",
}
#: Pydantic models of DeepSpeed's config sections, to name the section a schema error is in.
SECTION_OF_MODEL = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedFP16Config": "fp16",
}


def derive_deepspeed_config(spec: JobSpec, layout: Layout) -> dict[str, Any]:
    """The complete DeepSpeed config for ``spec`` with its overrides merged in (optimizer and
    scheduler stay the Trainer's). Raises :class:`SpecError` for a bad override or precision."""
    problems = precision_problems(layout.precision, layout.device)
    derived = derived_config(spec, layout)
    overrides = spec.resources.deepspeed_overrides
    problems += override_problems(overrides, derived)
    if problems:
        raise SpecError("resolving the plan", [f"{k}: {m}" for k, m in problems])
    return merge(derived, overrides)


def deepspeed_override_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Problems of ``resources.deepspeed_overrides`` against the config derived for ``spec``: a rule
    the plan adds to the spec's own (``flotilla validate`` reports them with line numbers). Checked
    once the ZeRO section itself is sound."""
    if not spec.resources.deepspeed_overrides or zero_problems(spec):
        return []
    return override_problems(spec.resources.deepspeed_overrides, derived_config(spec, job_layout(spec)))


def derived_config(spec: JobSpec, layout: Layout) -> dict[str, Any]:
    """Only the keys Flotilla derives from the spec and its layout."""
    zero = spec.resources.zero
    assert zero is not None
    pin = layout.device == "cuda"
    zero_section: dict[str, Any] = {
        "stage": zero.stage,
        "offload_optimizer": {"device": zero.offload_optimizer, "pin_memory": pin},
    }
    if zero.stage == 3:
        zero_section["offload_param"] = {"device": zero.offload_params, "pin_memory": pin}
        zero_section["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": spec.train.max_grad_norm,
        "bf16": {"enabled": layout.precision == "bf16"},
        "fp16": {"enabled": layout.precision == "fp16"},
        "zero_optimization": zero_section,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def precision_problems(precision: str, device: str) -> list[tuple[str, str]]:
    """What the device cannot do: fp16 on CPU, bf16 on a GPU without bf16 support."""
    if precision == "fp16" and device == "cpu":
        return [("resources.precision", "fp16 needs a GPU; use 'bf16' or 'fp32' on CPU")]
    if precision == "bf16" and device == "cuda":
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name()
            return [("resources.precision", f"bf16 is not supported by {name}; use 'fp16' or 'fp32'")]
    return []


def override_problems(overrides: dict[str, Any], derived: dict[str, Any]) -> list[tuple[str, str]]:
    """Every problem of ``overrides`` as ``(key path, message)``: ``auto`` values, Trainer-owned
    sections, conflicts with derived values, keys DeepSpeed does not read, DeepSpeed schema errors."""
    if not overrides:
        return []
    problems: list[tuple[str, str]] = []
    for path, value in _leaves(overrides):
        if value == "auto":
            problems.append((f"{OVERRIDES}.{path}", "'auto' is not allowed: Flotilla derives every value"))
    for key, owner in TRAINER_OWNED.items():
        if key in overrides:
            problems.append((f"{OVERRIDES}.{key}", f"set by the Trainer from {owner}; set those instead"))
    problems += _conflicts(overrides, derived, "")
    if problems:
        return problems
    return _schema_problems(merge(derived, overrides), set(overrides))


def _conflicts(overrides: dict[str, Any], derived: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    problems = []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in derived or value == "auto":
            continue
        mine = derived[key]
        if isinstance(mine, dict) and isinstance(value, dict):
            problems += _conflicts(value, mine, f"{path}.")
        elif value != mine:
            source = DERIVED_FROM.get(path, "Flotilla's derived config")
            problems.append(
                (f"{OVERRIDES}.{path}", f"{value!r} contradicts the derived value {mine!r} (from {source})")
            )
    return problems


def _schema_problems(config: dict[str, Any], overridden: set[str]) -> list[tuple[str, str]]:
    """Run DeepSpeed's own config parser over ``config``; report its errors and unread keys."""
    from deepspeed.runtime.config import DeepSpeedConfig

    reader = _RecordingDict({k: v for k, v in config.items() if k != "train_batch_size"})
    try:
        DeepSpeedConfig(reader)
    except ValidationError as exc:
        section = SECTION_OF_MODEL.get(exc.title, exc.title)
        return [
            (f"{OVERRIDES}.{section}.{'.'.join(str(p) for p in err['loc'])}", _describe(err, config, section))
            for err in exc.errors()
        ]
    except (ValueError, AssertionError, TypeError, KeyError) as exc:
        return [(OVERRIDES, f"DeepSpeed rejects the config: {exc}")]
    unread = sorted(key for key in overridden if key not in reader.read)
    return [(f"{OVERRIDES}.{key}", "DeepSpeed does not read this key (misspelt?)") for key in unread]


def _describe(error: Any, config: dict[str, Any], section: str) -> str:
    """DeepSpeed's schema error in words, with a did-you-mean for a misspelt key."""
    if error["type"] != "extra_forbidden":
        return f"{error['input']!r} is not allowed by DeepSpeed: {error['msg']}"
    known = [str(k) for k in _known_keys(section, error["loc"][:-1])]
    hint = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
    return "DeepSpeed has no such key" + (f"; did you mean {hint[0]!r}?" if hint else "")


def _known_keys(section: str, location: tuple[Any, ...]) -> list[str]:
    """Field names of DeepSpeed's pydantic model at ``section`` / ``location`` (empty if unknown)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    models = {
        "zero_optimization": DeepSpeedZeroConfig,
        "bf16": DeepSpeedBF16Config,
        "fp16": DeepSpeedFP16Config,
    }
    model: Any = models.get(section)
    for part in location:
        field = model.model_fields.get(part) if model else None
        model = next(
            (a for a in getattr(field.annotation, "__args__", ()) if hasattr(a, "model_fields")), None
        )
    return list(model.model_fields) if model else []


class _RecordingDict(dict):  # type: ignore[type-arg]
    """A config mapping that remembers which top-level keys DeepSpeed's parser looked up."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[Any] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def keys(self) -> Any:  # ``key in config.keys()`` is a lookup too
        return _RecordingKeys(self)

    def __copy__(self) -> _RecordingDict:
        return self


class _RecordingKeys:
    def __init__(self, mapping: _RecordingDict) -> None:
        self.mapping = mapping

    def __contains__(self, key: object) -> bool:
        return key in self.mapping

    def __iter__(self) -> Iterator[Any]:
        return iter(dict.keys(self.mapping))

    def __len__(self) -> int:
        return len(self.mapping)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, recursively (a new dict; the inputs are unchanged)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaves(mapping: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
