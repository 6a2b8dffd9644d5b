"""A merged Llama-architecture model written as one GGUF file with gguf's own writer, tensor name
map and quantizer: the layout llama.cpp's ``convert_hf_to_gguf.py`` writes (q/k rows permuted for
its rotary layout) and transformers' GGUF loader reads back (it undoes that permutation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import torch

from launcher.errors import FlotillaError

#: ``--quant`` choices: how the 2-D weights are stored (1-D norms stay float32, as llama.cpp does).
QUANTS = ("f16", "q8_0")
#: GGUF architectures this writer supports, by transformers' ``model_type``.
ARCHITECTURES = ("llama",)
#: llama.cpp's ``tokenizer.ggml.pre`` names of the byte-level pre-tokenizers recognised here.
PRE_TOKENIZERS = {
    '{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}': "gpt-2",
}
#: llama.cpp token types (``gguf.TokenType``): NORMAL, CONTROL, USER_DEFINED, UNUSED.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def check_gguf_support(config: Any, tokenizer: Any) -> None:
    """Refuse, with the reason, a model or tokenizer this writer cannot express in GGUF."""
    if config.model_type not in ARCHITECTURES:
        raise FlotillaError(
            f"--gguf supports the {', '.join(ARCHITECTURES)} architecture, not {config.model_type!r}; "
            "export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise FlotillaError(f"--gguf: rope scaling {rope.get('rope_type')!r} is not supported yet")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise FlotillaError("--gguf: Llama models with attention or MLP biases are not supported yet")
    pre_tokenizer_type(tokenizer)


def pre_tokenizer_type(tokenizer: Any) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer (byte-level BPE only)."""
    if not getattr(tokenizer, "is_fast", False):
        raise FlotillaError("--gguf needs a fast (tokenizer.json) tokenizer")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if (state.get("model") or {}).get("type") != "BPE":
        raise FlotillaError("--gguf supports byte-level BPE tokenizers only (gpt2 in llama.cpp's terms)")
    pre = json.dumps(state.get("pre_tokenizer"))
    if pre not in PRE_TOKENIZERS:
        raise FlotillaError(f"--gguf: the tokenizer's pre-tokenizer is not one it knows: {pre[:200]}")
    return PRE_TOKENIZERS[pre]


def write_gguf(model: Any, tokenizer: Any, tokenizer_folder: Path, path: Path, quant: str) -> None:
    """Write ``model`` (a merged ``LlamaForCausalLM``) and its tokenizer into the GGUF file ``path``.

    ``tokenizer_folder`` holds the saved tokenizer (tokenizer.json, tokenizer_config.json, chat
    template): gguf's ``SpecialVocab`` reads the merges, special ids and chat template from it.
    """
    config = model.config
    check_gguf_support(config, tokenizer)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hyperparameters(writer, config, quant)
        _add_tokenizer(writer, tokenizer, tokenizer_folder, config.vocab_size)
        for name, tensor in gguf_tensors(model).items():
            _add_tensor(writer, name, tensor, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_hyperparameters(writer: Any, config: Any, quant: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(str(getattr(config, "_name_or_path", "") or "flotilla-export"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: Any, tokenizer: Any, folder: Path, vocab_size: int) -> None:
    """The byte-level BPE vocabulary as llama.cpp's ``_set_vocab_gpt2`` writes it."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_type(tokenizer))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # a model's vocabulary padded past its tokenizer's
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(CONTROL if added[index].special else USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def gguf_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's tensors under GGUF names, q and k permuted as llama.cpp does."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    found: dict[str, torch.Tensor] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # no output.weight: the loader ties it to token_embd.weight
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        stem, _, suffix = hf_name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise FlotillaError(f"--gguf: no GGUF name for the tensor {hf_name!r}")
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = permute_rotary(tensor, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = permute_rotary(tensor, kv_heads)
        found[f"{name}.{suffix}"] = tensor.detach().to(torch.float32).cpu()
    return found


def permute_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from HF's half-split rotary layout to
    GGUF's interleaved one (transformers' loader applies the inverse)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_tensor(writer: Any, name: str, tensor: torch.Tensor, quant: str) -> None:
    """1-D tensors as float32; 2-D as f16, or q8_0 where the rows split into its 32-value blocks."""
    values = tensor.numpy()
    if tensor.dim() == 1:
        writer.add_tensor(name, values)
        return
    q8 = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[q8][0]
    if quant == "q8_0" and tensor.shape[-1] % block == 0:
        writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)
        return
    writer.add_tensor(name, tensor.to(torch.float16).numpy())
