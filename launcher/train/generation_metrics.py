"""ROUGE-L and BLEU of generated responses against the references of instruction or chat rows."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from launcher.data import IGNORE_INDEX


def prompts_and_references(
    rows: Any, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[list[int]], list[str]]:
    """Split encoded rows at their first learned token: the prompt ids and the reference text."""
    prompts, references = [], []
    for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if not start:
            continue
        target = [t for t in labels[start:] if t != IGNORE_INDEX]
        prompts.append(ids[:start])
        references.append(tokenizer.decode(target, skip_special_tokens=True).strip())
    return prompts, references


@torch.no_grad()
def generate(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy continuations of each prompt."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs.append(tokenizer.decode(generated[0, len(prompt) :], skip_special_tokens=True).strip())
    return outputs


def rouge_bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L F-measure and corpus BLEU (sacrebleu, 0–100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    return {"rougeL": sum(rouge) / max(len(rouge), 1), "bleu": float(bleu)}


def generation_metrics(
    model: Any, tokenizer: PreTrainedTokenizerBase, rows: Any, max_new_tokens: int, limit: int = 64
) -> dict[str, float]:
    """Generate for up to ``limit`` rows and score against their references."""
    prompts, references = prompts_and_references(rows[: min(limit, len(rows))], tokenizer)
    if not prompts:
        return {}
    return rouge_bleu(generate(model, tokenizer, prompts, max_new_tokens), references)
