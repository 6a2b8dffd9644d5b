"""Adapter arrays on the server: the initial global adapter, PEFT folders per round, Flower records.

Only LoRA adapter tensors (and the PEFT ``modules_to_save`` heads) ever become arrays here; the
base model is loaded once on the server to shape the adapter and to size what full weights would cost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from launcher.model import apply_peft, load_model, load_tokenizer
from launcher.spec import ModelSpec, PeftSpec
from launcher.train import save_verified

Arrays = dict[str, np.ndarray]


@dataclass
class GlobalModel:
    """The base model with the federation's LoRA adapter, kept on the server between rounds."""

    model: Any
    tokenizer: Any
    full_weight_bytes: int

    @classmethod
    def build(
        cls, model_spec: ModelSpec, peft_spec: PeftSpec, labels: list[str] | None, seed: int
    ) -> GlobalModel:
        """Base model + a fresh LoRA adapter (A random, B zero) drawn with ``seed``."""
        torch.manual_seed(seed)
        tokenizer = load_tokenizer(model_spec)
        base = load_model(model_spec, labels, tokenizer)
        full = sum(t.numel() * t.element_size() for t in _unique_tensors(base))
        model = apply_peft(base, peft_spec.model_copy(update={"init_from": None}), model_spec.task)
        return cls(model, tokenizer, full)

    def arrays(self) -> Arrays:
        """The adapter's tensors as float32 numpy arrays, in PEFT's key order."""
        from peft import get_peft_model_state_dict

        return {
            k: v.detach().cpu().float().numpy().copy()
            for k, v in get_peft_model_state_dict(self.model).items()
        }

    def save(self, arrays: Mapping[str, np.ndarray], folder: Path) -> Path:
        """Load ``arrays`` into the adapter and publish a verified PEFT folder at ``folder``."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        set_peft_model_state_dict(self.model, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
        expected = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

        def write(target: Path) -> None:
            self.model.save_pretrained(target, safe_serialization=True)
            self.tokenizer.save_pretrained(target)

        save_verified(write, expected, "adapter_model.safetensors", folder)
        return folder


def _unique_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out.append(tensor)
    return out


def complete_from(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], keep: Callable[[str], bool]
) -> Arrays:
    """``arrays`` with every tensor ``keep`` names taken from ``reference`` (whatever was sent for
    it is ignored), in ``reference``'s key order."""
    merged = {k: v for k, v in arrays.items() if not keep(k)}
    merged.update({k: v for k, v in reference.items() if keep(k)})
    return {k: merged[k] for k in reference if k in merged} | {
        k: v for k, v in merged.items() if k not in reference
    }


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays -> a Flower ``ArrayRecord`` (same keys, same order)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """A Flower ``ArrayRecord`` -> numpy arrays (same keys, same order)."""
    return {k: v.numpy() for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (what travels, without message framing)."""
    return int(sum(len(v.data) for v in record.values()))


def trainable_matches(
    model: torch.nn.Module, arrays: Mapping[str, np.ndarray]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Each trainable parameter of ``model`` paired with the array of the same adapter tensor (PEFT's
    ``.default.`` and ``.modules_to_save.`` left out of the name), as a tensor of its device and dtype."""
    keyed = {key.removesuffix(".weight"): value for key, value in arrays.items()}
    pairs = []
    for name, param in model.named_parameters():
        key = name.replace(".default.", ".").replace(".modules_to_save.", ".").removesuffix(".weight")
        array = keyed.get(key) if param.requires_grad else None
        if array is not None and tuple(np.shape(array)) == tuple(param.shape):
            pairs.append((param, torch.as_tensor(np.asarray(array)).to(param.device, param.dtype)))
    return pairs
