"""The paper's metrics against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from classifiers.metrics import METRIC_NAMES, classification_metrics

# Three classes, six images. Rows are the predicted probabilities; the argmax predictions are
# [0, 1, 1, 1, 2, 0] against the labels [0, 0, 1, 1, 2, 2].
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array([
    [0.6, 0.3, 0.1],
    [0.3, 0.5, 0.2],
    [0.2, 0.7, 0.1],
    [0.1, 0.6, 0.3],
    [0.1, 0.2, 0.7],
    [0.5, 0.1, 0.4],
])


def test_three_classes_by_hand() -> None:
    m = classification_metrics(LABELS, PROBS)
    assert set(METRIC_NAMES) <= set(m)
    # 4 of 6 right.
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Recall per class: 1/2, 2/2, 1/2; balanced accuracy and macro recall are their mean.
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["macro_recall"] == pytest.approx(2 / 3)
    # Precision per class: predicted 0 -> {0, 2}: 1/2; predicted 1 -> {0, 1, 1}: 2/3; predicted 2 -> {2}: 1.
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    # F1 per class: 2PR/(P+R) = 0.5, 0.8, 2/3.
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # One-vs-rest AUC = share of (positive, negative) pairs ranked right.
    # Class 0: positives 0.6, 0.3 against 0.2, 0.1, 0.1, 0.5 -> 4 + 3 of 8. Classes 1 and 2: 8 of 8.
    assert m["roc_auc"] == pytest.approx((7 / 8 + 1.0 + 1.0) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_two_classes_by_hand() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]])  # predictions 0, 1, 0, 1
    m = classification_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["macro_precision"] == pytest.approx(0.5)
    assert m["macro_recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.5)
    # Positives score 0.4 and 0.8 against negatives 0.1 and 0.6: 3 of the 4 pairs ranked right.
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]


def test_class_never_predicted_counts_zero_precision() -> None:
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.1, 0.2, 0.7]])  # predicts 0, 0, 2, 2
    m = classification_metrics(labels, probs)
    # Precision: class 0 1/2, class 1 never predicted -> 0, class 2 1; recall 1, 0, 1.
    assert m["macro_precision"] == pytest.approx(0.5)
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0 + 1.0) / 3)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_auc_averages_over_present_classes_and_is_nan_with_one() -> None:
    # Class 2 has no image: its AUC is undefined and left out of the average (classes 0 and 1 rank perfectly).
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    assert classification_metrics(np.array([0, 1, 0, 1]), probs)["roc_auc"] == pytest.approx(1.0)
    assert math.isnan(classification_metrics(np.array([0, 0, 0, 0]), probs)["roc_auc"])
