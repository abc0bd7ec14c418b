"""The paper's metrics, computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "roc_auc")


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, object]:
    """Accuracy, balanced accuracy, macro precision/recall/F1, one-vs-rest macro ROC AUC, confusion matrix.

    Args:
        labels: true classes, shape (N,).
        probs: predicted class probabilities, shape (N, K).
    ROC AUC is averaged over the classes present in ``labels`` (NaN when fewer than two are).
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(1)
    classes = np.arange(k)
    p, r, f, _ = precision_recall_fscore_support(labels, pred, labels=classes, average="macro", zero_division=0)
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")
    elif k == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    else:
        aucs = [roc_auc_score(labels == c, probs[:, c]) for c in present]
        auc = float(np.mean(aucs))
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
        "roc_auc": auc,
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
    }
