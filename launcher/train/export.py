"""``flotilla export``: a LoRA run merged into its base weights (peft's ``merge_and_unload``) as a
plain Hugging Face folder, optionally with a GGUF file; every output is verified by reloading it
from disk and comparing logits on fixed probe texts, then published with one rename."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from launcher.atomic import publish_dir, staging_dir
from launcher.errors import ExportError, FlotillaError
from launcher.model import load_tokenizer
from launcher.spec import JobSpec
from launcher.train.evaluate import load_trained, locate_run
from launcher.train.gguf_export import QUANTS, check_gguf_support, write_gguf

#: Max abs logit difference allowed between the merged model reloaded from disk and base + adapter
#: (peft, unmerged), both float32: merging only reorders float32 sums.
MERGE_TOLERANCE = 1e-4
#: Max abs logit difference allowed between the GGUF model (loaded back by transformers) and the
#: merged model, as a fraction of the largest |logit| on the probes (at least 1): f16 rounds weights
#: to 11 significant bits, q8_0 to 8 bits per 32-value block.
GGUF_TOLERANCES = {"f16": 5e-3, "q8_0": 5e-2}
#: Probe texts: fixed, so that a verification is reproducible (a chat-formatted one is added where
#: the tokenizer has a chat template).
PROBES = (
    "The capital of France is Paris, and the capital of Italy is",
    "def add(a, b):\n    return a + b  # 12345",
    "I loved this film: the acting was great and the ending moved me.",
)
#: The export's record of what was verified, written into the output folder.
RECORD = "flotilla-export.json"


@dataclass
class ExportResult:
    """What ``flotilla export`` wrote and how closely each output matched."""

    out: Path
    merge_max_abs_diff: float
    merge_tolerance: float = MERGE_TOLERANCE
    labels: list[str] | None = None
    gguf_file: Path | None = None
    gguf_quant: str | None = None
    gguf_max_abs_diff: float | None = None
    gguf_tolerance: float | None = None
    probes: int = 0


def export_run(
    target: Path, out: Path | None = None, gguf_quant: str | None = None, force: bool = False
) -> ExportResult:
    """Merge the LoRA adapter of ``target`` (a run dir or its adapter folder) into its base model,
    write it (and a GGUF file with ``gguf_quant``) to ``out``, verified; return what was measured."""
    spec, adapter = locate_adapter(target)
    out = (out or adapter.parent / "export").resolve()
    if out.exists() and not force:
        raise FlotillaError(f"{out} already exists: choose another --out, or replace it with --force")
    if gguf_quant is not None and gguf_quant not in QUANTS:
        raise FlotillaError(f"--quant {gguf_quant!r}: choose one of {', '.join(QUANTS)}")
    if gguf_quant and spec.model.task != "causal_lm":
        raise FlotillaError(f"--gguf exports causal language models, not {spec.model.task}")
    labels = run_labels(adapter)
    tokenizer = load_tokenizer(spec.model)
    fp32 = spec.model_copy(update={"model": spec.model.model_copy(update={"dtype": "float32"})})
    model = load_trained(fp32, adapter, labels).eval()
    if gguf_quant:
        check_gguf_support(model.config, tokenizer)
    probes = probe_inputs(tokenizer, spec.model.task)
    reference = logits_of(model, probes)
    merged = merge_checked(model)
    staging = staging_dir(out)
    try:
        result = _write_verified(merged, tokenizer, spec, probes, reference, staging, out)
        result.labels = labels
        if gguf_quant:
            _write_gguf_verified(merged, tokenizer, staging, out, spec.name, gguf_quant, probes, result)
        (staging / RECORD).write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
        if out.exists():  # --force: replaced only once the new export is verified
            shutil.rmtree(out)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def locate_adapter(target: Path) -> tuple[JobSpec, Path]:
    """The run's spec and its LoRA adapter folder, or a clear error for anything else."""
    if not target.exists():
        raise FlotillaError(f"{target} does not exist")
    spec, artifact = locate_run(target)
    if spec.peft.method != "lora":
        raise FlotillaError(
            f"{target} is a full fine-tune (peft.method {spec.peft.method!r}): there is no adapter to "
            f"merge; its model/ folder already loads with from_pretrained"
        )
    if not (artifact / "adapter_config.json").is_file():
        raise FlotillaError(f"{artifact} holds no LoRA adapter (no adapter_config.json)")
    return spec, artifact


def run_labels(adapter: Path) -> list[str] | None:
    """The classification label names of the run (summary.json), in index order; None otherwise."""
    summary = adapter.parent / "summary.json"
    labels = json.loads(summary.read_text()).get("labels") if summary.is_file() else None
    if labels is None and (adapter / "labels.json").is_file():
        labels = json.loads((adapter / "labels.json").read_text())["labels"]
    return labels


def probe_inputs(tokenizer: Any, task: str) -> list[dict[str, torch.Tensor]]:
    """The probe texts as model inputs, one row each (no padding to mask)."""
    texts = list(PROBES)
    if task == "causal_lm" and tokenizer.chat_template:
        chat = [{"role": "user", "content": "Name three colours."}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    return [dict(tokenizer(text, return_tensors="pt")) for text in texts]


@torch.no_grad()
def logits_of(model: Any, probes: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The model's float32 logits on every probe."""
    return [model(**probe).logits.float() for probe in probes]


def max_abs_diff(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """The largest absolute difference over every probe's logits."""
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))


def merge_checked(model: Any) -> Any:
    """peft's ``merge_and_unload``, refused when it would leave every LoRA-targeted weight equal to
    the base (all LoRA B matrices zero, as in an untrained adapter): that export holds no adapter."""
    layers = {name: module for name, module in model.named_modules() if hasattr(module, "lora_B")}
    if not layers:
        raise FlotillaError("the adapter has no LoRA layers: there is nothing to merge")
    before = {name: module.get_base_layer().weight.detach().clone() for name, module in layers.items()}
    merged = model.merge_and_unload()
    after = dict(merged.named_modules())
    prefix = "base_model.model."
    changed = [
        name
        for name, weight in before.items()
        if not torch.equal(after[name.removeprefix(prefix)].weight, weight)
    ]
    if not changed:
        raise FlotillaError(
            f"merging the adapter leaves all {len(before)} LoRA-targeted weights equal to the base model's "
            "(every LoRA B matrix is zero: an untrained adapter?): refusing to export the base model as a "
            "fine-tune"
        )
    return merged


def _write_verified(
    merged: Any,
    tokenizer: Any,
    spec: JobSpec,
    probes: list[dict[str, torch.Tensor]],
    reference: list[torch.Tensor],
    staging: Path,
    out: Path,
) -> ExportResult:
    """Save the merged model and tokenizer into ``staging``, reload both from disk, compare."""
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    auto = (
        AutoModelForSequenceClassification
        if spec.model.task == "sequence_classification"
        else AutoModelForCausalLM
    )
    reloaded = auto.from_pretrained(staging, dtype=torch.float32).eval()
    diff = max_abs_diff(reference, logits_of(reloaded, probes))
    if diff > MERGE_TOLERANCE:
        raise ExportError(
            f"the merged model reloaded from disk differs from base + adapter by {diff:.3g} in the logits "
            f"(allowed: {MERGE_TOLERANCE}); nothing was written to {out}"
        )
    _check_tokenizer(AutoTokenizer.from_pretrained(staging), tokenizer, probes, "the exported folder")
    return ExportResult(out=out, merge_max_abs_diff=diff, probes=len(probes))


def _write_gguf_verified(
    merged: Any,
    tokenizer: Any,
    staging: Path,
    out: Path,
    job: str,
    quant: str,
    probes: list[dict[str, torch.Tensor]],
    result: ExportResult,
) -> None:
    """Write ``gguf/<job name>-<quant>.gguf`` (its own folder: transformers' GGUF loader would mix in a
    tokenizer_config.json beside it), load it back through transformers' GGUF loader, compare."""
    folder = staging / "gguf"
    folder.mkdir()
    name = f"{job}-{quant}.gguf"
    write_gguf(merged, tokenizer, staging, folder / name, quant)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    reference = logits_of(merged, probes)
    scale = max(1.0, max(r.abs().max().item() for r in reference))
    diff = max_abs_diff(reference, logits_of(loaded, probes))
    allowed = GGUF_TOLERANCES[quant] * scale
    if diff > allowed:
        raise ExportError(
            f"the {quant} GGUF model differs from the merged model by {diff:.3g} in the logits (allowed: "
            f"{allowed:.3g} = {GGUF_TOLERANCES[quant]} x the largest |logit| {scale:.3g}); nothing was "
            f"written to {out}"
        )
    _check_tokenizer(
        AutoTokenizer.from_pretrained(folder, gguf_file=name), tokenizer, probes, "the GGUF file"
    )
    result.gguf_file, result.gguf_quant = out / "gguf" / name, quant
    result.gguf_max_abs_diff, result.gguf_tolerance = diff, allowed


def _check_tokenizer(loaded: Any, tokenizer: Any, probes: list[dict[str, torch.Tensor]], where: str) -> None:
    """The reloaded tokenizer encodes the probes to the same ids and keeps the chat template."""
    for probe in probes:
        text = tokenizer.decode(probe["input_ids"][0])
        if loaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
            raise ExportError(f"the tokenizer of {where} encodes {text[:60]!r} differently from the run's")
    if (loaded.chat_template or None) != (tokenizer.chat_template or None):
        raise ExportError(f"the tokenizer of {where} lost the chat template")
