"""Turn canonical rows into model inputs: token ids, labels (loss mask) and lengths."""

from __future__ import annotations

from bisect import bisect_left
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
    batch = encode_batch({key: [value] for key, value in row.items()}, tokenizer, max_length, label_ids)
    return {key: batch[key][0] for key in ("input_ids", "labels", "full_length")}


def encode_batch(
    batch: dict[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_ids: dict[str, int] | None = None,
) -> dict[str, list[Any]]:
    """``encode_row`` over a column batch (as ``Dataset.map(batched=True)`` hands it), tokenized in
    one call; adds ``length`` and the ``overlong``/``no_target`` flags the checks count."""
    if "label" in batch:
        full = tokenizer(batch["text"], truncation=False)["input_ids"]
        labels: list[Any] = [(label_ids or {})[name] for name in batch["label"]]
    elif "text" in batch:
        full = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full = [[*ids, tokenizer.eos_token_id] for ids in full]
        labels = [list(ids) for ids in full]
    else:
        conversations = (
            batch["messages"]
            if "messages" in batch
            else [
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                for prompt, response in zip(batch["prompt"], batch["response"], strict=True)
            ]
        )
        full, labels = _encode_chats(conversations, tokenizer)
    ids = [row[:max_length] for row in full]
    if labels and isinstance(labels[0], list):
        labels = [row[:max_length] for row in labels]
    return {
        "input_ids": ids,
        "labels": labels,
        "full_length": [len(row) for row in full],
        "length": [len(row) for row in ids],
        "overlong": [len(row) > max_length for row in full],
        "no_target": [isinstance(row, list) and all(t == IGNORE_INDEX for t in row) for row in labels],
    }


def _encode_chats(
    conversations: list[list[dict[str, str]]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[list[int]], list[list[int]]]:
    """Render each conversation with the chat template; only assistant turns carry a loss."""
    if not tokenizer.chat_template:
        pairs = [_encode_plain_chat(messages, tokenizer) for messages in conversations]
        return [ids for ids, _ in pairs], [labels for _, labels in pairs]
    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    spans = [_assistant_spans(m, tokenizer, text) for m, text in zip(conversations, texts, strict=True)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        _mask_outside(ids, [begin for begin, _ in offsets], row_spans)
        for ids, offsets, row_spans in zip(
            encoded["input_ids"], encoded["offset_mapping"], spans, strict=True
        )
    ]
    return encoded["input_ids"], labels


def _mask_outside(ids: list[int], begins: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """``ids`` where a token starts inside one of the character ``spans``, else IGNORE_INDEX.

    Token start offsets ascend, so each span is one slice found by bisection (not a test per token
    and span); offsets out of order fall back to the test per token."""
    if begins != sorted(begins):
        return [
            t if any(s <= b < e for s, e in spans) else IGNORE_INDEX for t, b in zip(ids, begins, strict=True)
        ]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        first, stop = bisect_left(begins, start), bisect_left(begins, end)
        labels[first:stop] = ids[first:stop]
    return labels


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
