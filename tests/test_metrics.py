"""ei.metrics against brute-force implementations written independently here."""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest

from ei.metrics import average_precision, compute_metrics, format_table, roc_auc, write_csv


def brute_auc(y, s):
    """Share of (positive, negative) pairs ranked right, ties counting one half."""
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def brute_ap(y, s):
    """Mean over positives of the precision when everything scoring >= it is called positive."""
    if y.sum() == 0:
        return math.nan
    precisions = [np.sum(y[s >= s[i]]) / np.sum(s >= s[i]) for i in np.flatnonzero(y)]
    return float(np.mean(precisions))


def brute_counts(t, p):
    tp = sum(1 for a, b in zip(t, p) if a and b)
    fp = sum(1 for a, b in zip(t, p) if not a and b)
    fn = sum(1 for a, b in zip(t, p) if a and not b)
    tn = sum(1 for a, b in zip(t, p) if not a and not b)
    return tp, fp, fn, tn


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def test_known_values():
    # The example of sklearn's documentation.
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert average_precision(y, s) == pytest.approx(0.8333333333)
    assert roc_auc(y, s) == pytest.approx(0.75)
    # All scores tied: one threshold, precision = prevalence; AUC = 0.5.
    y, s = np.array([1, 0, 0, 1, 0]), np.full(5, 0.3)
    assert average_precision(y, s) == pytest.approx(0.4)
    assert roc_auc(y, s) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(20))
def test_ap_and_auc_random_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    y = (rng.random(n) < rng.uniform(0.05, 0.9)).astype(int)
    # Few distinct values: many ties, within and across classes.
    s = np.round(rng.random(n), int(rng.integers(1, 3)))
    assert same(average_precision(y, s), brute_ap(y, s))
    assert same(roc_auc(y, s), brute_auc(y, s))


def test_undefined_values_are_nan():
    assert math.isnan(average_precision(np.zeros(4), np.arange(4.0)))
    assert math.isnan(roc_auc(np.zeros(4), np.arange(4.0)))
    assert math.isnan(roc_auc(np.ones(4), np.arange(4.0)))


@pytest.mark.parametrize("seed", range(5))
def test_single_label_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = 40, 4
    targets = rng.choice([0, 1, 3], size=n)  # class 2 has no positive
    scores = np.round(rng.dirichlet(np.ones(k), size=n), 1)
    m = compute_metrics(targets, scores, multi_label=False, class_names="abcd")
    predicted = scores.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(np.mean(predicted == targets))
    assert m["num_samples"] == n and "label_accuracy" not in m
    for c, row in enumerate(m["per_class"]):
        t, p = targets == c, predicted == c
        tp, fp, fn, tn = brute_counts(t, p)
        assert row["class"] == "abcd"[c] and row["support"] == t.sum()
        assert same(row["ap"], brute_ap(t.astype(int), scores[:, c]))
        assert same(row["auc"], brute_auc(t.astype(int), scores[:, c]))
        assert same(row["sensitivity"], tp / (tp + fn) if tp + fn else math.nan)
        assert same(row["specificity"], tn / (tn + fp) if tn + fp else math.nan)
        assert same(row["f1"], 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan)
        assert same(row["accuracy"], (tp + tn) / n)
    absent = m["per_class"][2]
    assert math.isnan(absent["ap"]) and math.isnan(absent["sensitivity"])
    present = [brute_ap((targets == c).astype(int), scores[:, c]) for c in (0, 1, 3)]
    assert m["mAP"] == pytest.approx(np.mean(present))


def test_multi_label_threshold_and_accuracies():
    targets = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 1]])
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.4, 0.2], [0.7, 0.3, 0.1], [0.6, 0.1, 0.8]])
    names = ["abnormal", "meniscus", "acl"]
    m = compute_metrics(targets, scores, multi_label=True, class_names=names)
    # Predictions at >= 0.5: [1,0,1] [0,0,0] [1,0,0] [1,0,1]: rows 0 and 1 exactly right.
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["label_accuracy"] == pytest.approx(10 / 12)
    meniscus = m["per_class"][1]
    assert meniscus["sensitivity"] == 0.0 and meniscus["specificity"] == 1.0
    assert meniscus["f1"] == 0.0
    for c in range(3):
        assert same(m["per_class"][c]["auc"], brute_auc(targets[:, c], scores[:, c]))
        assert same(m["per_class"][c]["ap"], brute_ap(targets[:, c], scores[:, c]))


def test_no_positive_anywhere_gives_nan_map_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(np.zeros((3, 2)), np.full((3, 2), 0.2), multi_label=True)
    assert math.isnan(m["mAP"]) and math.isnan(m["mAUC"]) and m["accuracy"] == 1.0


def test_shape_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        compute_metrics(np.zeros((3, 2)), np.zeros((3, 4)), multi_label=True)


def test_table_and_csv(tmp_path):
    targets = np.array([0, 1, 1, 0, 2])
    scores = np.eye(3)[[0, 1, 0, 0, 1]] * 0.8 + 0.1
    m = compute_metrics(targets, scores, multi_label=False, class_names=["no_amd", "pcv", "wet"])
    table = format_table(m)
    lines = table.splitlines()
    header = ["class", "support", "ap", "auc", "sensitivity", "specificity", "f1", "accuracy"]
    assert lines[0].split() == header
    names = [line.split()[0] for line in lines if line[0].isalpha()][1:]
    assert names == ["no_amd", "pcv", "wet", "overall"]
    assert f"{m['mAP']:.4f}" in lines[-1]
    write_csv(m, tmp_path / "m.csv")
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["no_amd", "pcv", "wet", "overall"]
    assert float(rows[-1]["ap"]) == pytest.approx(m["mAP"])
    assert float(rows[-1]["accuracy"]) == pytest.approx(m["accuracy"]) == pytest.approx(0.6)
    assert int(rows[-1]["support"]) == 5 and int(rows[1]["support"]) == 2


def test_nan_scores_give_nan_ranking_metrics_and_no_prediction():
    """A diverged model's nan scores: AP and AUC nan (never a ranking of nan), and a sample with
    a nan score predicts nothing, so it counts as wrong."""
    scores = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8], [0.3, 0.7]])
    targets = np.array([0, 0, 1, 1])
    assert math.isnan(average_precision(targets == 0, scores[:, 0]))
    assert math.isnan(roc_auc(targets == 0, scores[:, 0]))
    metrics = compute_metrics(targets, scores, multi_label=False)
    assert math.isnan(metrics["mAP"]) and math.isnan(metrics["mAUC"])
    assert metrics["accuracy"] == 0.75
    multi = compute_metrics(np.eye(2)[targets], scores, multi_label=True)
    assert multi["accuracy"] == 0.75 and math.isnan(multi["mAP"])
