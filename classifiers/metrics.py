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
SHORTCUT_NAMES = ("accuracy_preferred", "accuracy_other", "shortcut_gap")
"""Reported where the data knows each image's modality and each class's preferred one (synthrad)."""
SCALAR_METRICS = ("loss", *METRIC_NAMES, *SHORTCUT_NAMES)
"""Every scalar an evaluation may report (``loss`` and the shortcut metrics where the data allows)."""


def shortcut_metrics(labels: np.ndarray, pred: np.ndarray, in_preferred: np.ndarray) -> dict[str, float]:
    """Accuracy on images shown in their class's preferred modality, on the others, and the **shortcut gap**
    between them (preferred - other). A classifier that reads the class from the content alone has a gap near 0;
    one that leans on modality texture is right more often where texture and class agree.

    Args:
        labels: true classes, shape (N,).
        pred: predicted classes, shape (N,).
        in_preferred: whether each image shows its class's preferred modality, shape (N,) bool.
    A group with no image gives NaN for its accuracy and the gap.
    """
    correct = np.asarray(labels) == np.asarray(pred)
    in_preferred = np.asarray(in_preferred, dtype=bool)
    pref = float(correct[in_preferred].mean()) if in_preferred.any() else float("nan")
    other = float(correct[~in_preferred].mean()) if (~in_preferred).any() else float("nan")
    return {"accuracy_preferred": pref, "accuracy_other": other, "shortcut_gap": pref - other}


def classification_metrics(labels: np.ndarray, probs: np.ndarray, in_preferred: np.ndarray | None = None
                           ) -> dict[str, object]:
    """Accuracy, balanced accuracy, macro precision/recall/F1, one-vs-rest macro ROC AUC, confusion matrix, and,
    given ``in_preferred``, the shortcut metrics (:func:`shortcut_metrics`).

    Args:
        labels: true classes, shape (N,).
        probs: predicted class probabilities, shape (N, K).
        in_preferred: whether each image shows its class's preferred modality, shape (N,), or None.
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
    shortcut = shortcut_metrics(labels, pred, in_preferred) if in_preferred is not None else {}
    return {
        **shortcut,
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
        "roc_auc": auc,
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
    }
