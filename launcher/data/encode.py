"""Turn canonical rows into model inputs: token ids, labels (loss mask) and lengths."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from launcher.errors import DataError

IGNORE_INDEX = -100


def row_text(row: dict[str, Any]) -> str:
    """The text content of a row, for emptiness checks, dedup and leakage detection."""
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"])
    if "prompt" in row:
        return f"{row['prompt']}\n{row['response']}"
    return row["text"]


def encode_row(
    row: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_ids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Token ids and labels for one row; ``full_length`` is the length before truncation."""
    if "label" in row:
        ids = tokenizer(row["text"], truncation=False)["input_ids"]
        return {
            "input_ids": ids[:max_length],
            "labels": (label_ids or {})[row["label"]],
            "full_length": len(ids),
        }
    if "messages" in row:
        ids, labels = _encode_chat(row["messages"], tokenizer)
    elif "prompt" in row:
        ids, labels = _encode_chat(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}],
            tokenizer,
        )
    else:
        ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        labels = list(ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "full_length": len(ids)}


def _encode_chat(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Render with the chat template; only assistant turns carry a loss."""
    if not tokenizer.chat_template:
        return _encode_plain_chat(messages, tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    spans = _assistant_spans(messages, tokenizer, text)
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def _assistant_spans(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, text: str
) -> list[tuple[int, int]]:
    """Character spans of each assistant reply (with its end-of-turn marker) in ``text``."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through.rstrip())):
            raise DataError(
                "format 'chat': this tokenizer's chat template does not render a conversation prefix by "
                "prefix, so the assistant turns cannot be located for the loss mask; use format "
                "'instruction' or 'text', or a model whose template does"
            )
        spans.append((len(before), len(through.rstrip())))
    return spans


def _encode_plain_chat(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """A template-free rendering for tokenizers without a chat template."""
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for message in messages:
        prefix = tokenizer(f"{message['role']}: ", add_special_tokens=False)["input_ids"]
        body = tokenizer(message["content"] + "\n", add_special_tokens=False)["input_ids"]
        if message["role"] == "assistant" and tokenizer.eos_token_id is not None:
            body = [*body, tokenizer.eos_token_id]
        ids += prefix + body
        labels += [IGNORE_INDEX] * len(prefix)
        labels += body if message["role"] == "assistant" else [IGNORE_INDEX] * len(body)
    return ids, labels
