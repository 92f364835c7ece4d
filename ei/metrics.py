"""Evaluation metrics of docs/EI_SPEC.md ("Evaluation"), in numpy only.

Scores are probabilities: softmax outputs for single-label data, sigmoid outputs for
multi-label data. Per class (one-vs-rest): average precision, ROC AUC, sensitivity,
specificity, F1, one-vs-rest accuracy and support (number of positives).

- Prediction: single-label, the argmax class; multi-label, every class whose
  probability is >= ``threshold`` (0.5).
- ``accuracy``: single-label, the share of samples whose argmax is right; multi-label,
  the share whose whole label set is predicted exactly (exact match). Multi-label
  results also carry ``label_accuracy``, the share of right (sample, label) decisions.
- ``mAP``: the mean of AP over classes that have at least one positive (nan-mean).
  ``mAUC`` and the macro ``sensitivity``, ``specificity`` and ``f1`` are nan-means too.
- Undefined values (AUC with one class present, sensitivity with no positive, ...) are nan.
- A sample whose scores are not all finite (a diverged model) predicts no class, so it counts
  as wrong, and the AP and AUC of every class are nan: never a ranking of nan scores.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

COLUMNS = ("support", "ap", "auc", "sensitivity", "specificity", "f1", "accuracy")


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Step-wise AP as sklearn's average_precision_score: sum_n (R_n - R_{n-1}) P_n over
    the distinct score thresholds, high to low (tied scores form one threshold)."""
    y_true = np.asarray(y_true, dtype=bool)
    positives = int(y_true.sum())
    if positives == 0 or not np.isfinite(scores).all():
        return math.nan
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    sorted_scores, hits = np.asarray(scores)[order], y_true[order]
    # Last position of each run of equal scores: the ends of the thresholds.
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(hits) - 1]
    tp = np.cumsum(hits)[ends]
    precision = tp / (ends + 1)
    recall_gain = np.diff(np.r_[0, tp]) / positives
    return float(np.sum(recall_gain * precision))


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score_pos > score_neg) + P(tie) / 2,
    which equals the trapezoidal area under the ROC curve."""
    y_true = np.asarray(y_true, dtype=bool)
    positives, negatives = int(y_true.sum()), int((~y_true).sum())
    if positives == 0 or negatives == 0 or not np.isfinite(scores).all():
        return math.nan
    return float((_average_ranks(scores)[y_true].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _nanmean(values: Sequence[float]) -> float:
    # np.nanmean warns on an all-nan input; nan is the answer we want there.
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def compute_metrics(
    targets: np.ndarray,
    scores: np.ndarray,
    multi_label: bool,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
) -> dict:
    """Metrics for N samples and K classes.

    ``targets``: (N,) class indices (single-label) or (N, K) 0/1 (multi-label).
    ``scores``: (N, K) probabilities. Returns {"accuracy", "mAP", "mAUC", "sensitivity",
    "specificity", "f1", "num_samples", "per_class": [{"class", *COLUMNS}, ...]}, plus
    "label_accuracy" for multi-label data.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    if multi_label:
        truth = np.asarray(targets).astype(bool)
        predicted = scores >= threshold
    else:
        labels = np.asarray(targets).astype(np.int64)
        truth = np.eye(k, dtype=bool)[labels]
        predicted = np.eye(k, dtype=bool)[scores.argmax(axis=1)]
    predicted &= np.isfinite(scores).all(axis=1, keepdims=True)
    if truth.shape != (n, k):
        raise ValueError(f"targets of shape {np.shape(targets)} do not match scores {scores.shape}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]

    per_class = []
    for c in range(k):
        t, p = truth[:, c], predicted[:, c]
        tp, fp = int(np.sum(t & p)), int(np.sum(~t & p))
        fn, tn = int(np.sum(t & ~p)), int(np.sum(~t & ~p))
        per_class.append({
            "class": names[c],
            "support": int(t.sum()),
            "ap": average_precision(t, scores[:, c]),
            "auc": roc_auc(t, scores[:, c]),
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy": (tp + tn) / n,
        })

    result = {
        "num_samples": n,
        "accuracy": float(np.mean(np.all(truth == predicted, axis=1))),
        "mAP": _nanmean([row["ap"] for row in per_class]),
        "mAUC": _nanmean([row["auc"] for row in per_class]),
        **{key: _nanmean([row[key] for row in per_class])
           for key in ("sensitivity", "specificity", "f1")},
        "per_class": per_class,
    }
    if multi_label:
        result["label_accuracy"] = float(np.mean(truth == predicted))
    return result


def _overall_row(metrics: dict) -> dict:
    """The summary row of the table: means over classes, overall accuracy."""
    return {"class": "overall", "support": metrics["num_samples"], "ap": metrics["mAP"],
            "auc": metrics["mAUC"], "sensitivity": metrics["sensitivity"],
            "specificity": metrics["specificity"], "f1": metrics["f1"],
            "accuracy": metrics["accuracy"]}


def format_table(metrics: dict) -> str:
    """A plain-text table: one row per class, then an ``overall`` row (mAP, mean AUC, ...,
    overall accuracy; support there is the number of samples)."""
    overall = _overall_row(metrics)
    width = max(len(r["class"]) for r in [*metrics["per_class"], overall])
    header = f"{'class':<{width}} " + " ".join(f"{c:>11}" for c in COLUMNS)

    def line(row: dict) -> str:
        cells = [f"{row['support']:>11d}"] + [f"{row[c]:>11.4f}" for c in COLUMNS[1:]]
        return f"{row['class']:<{width}} " + " ".join(cells)

    rule = "-" * len(header)
    lines = [header, rule, *map(line, metrics["per_class"]), rule, line(overall)]
    return "\n".join(lines)


def write_csv(metrics: dict, path: str | Path) -> None:
    """The same rows as :func:`format_table` as CSV (nan written as 'nan')."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["class", *COLUMNS])
        writer.writeheader()
        for row in metrics["per_class"] + [_overall_row(metrics)]:
            writer.writerow(row)
