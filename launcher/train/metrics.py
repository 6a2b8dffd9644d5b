"""Task metrics: perplexity for causal LMs; accuracy, precision, recall, F1 and AUC for classifiers."""

from __future__ import annotations

import math

import numpy as np
from transformers import EvalPrediction


def is_task_metric(key: str, value: object) -> bool:
    """Losses and task metrics, not timings or counters."""
    noise = ("runtime", "per_second", "preparation_time", "tokens_seen", "epoch")
    return isinstance(value, int | float) and not any(word in key for word in noise)


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay finite."""
    return math.exp(min(loss, 50.0))


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Metrics from logits and integer labels (macro averages beyond two classes)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    logits = (
        prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    )
    labels = np.asarray(prediction.label_ids)
    logits = np.asarray(logits, dtype=np.float64)
    predicted = logits.argmax(axis=-1)
    probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    binary = logits.shape[-1] == 2
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, average="binary" if binary else "macro", zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
    try:
        metrics["auc"] = float(
            roc_auc_score(labels, probabilities[:, 1])
            if binary
            else roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(logits.shape[-1])))
        )
    except ValueError:  # a single class present in this evaluation set
        metrics["auc"] = float("nan")
    return metrics


def majority_baseline(labels: list[int]) -> float:
    """Accuracy of always predicting the most common label."""
    if not labels:
        return 0.0
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())
