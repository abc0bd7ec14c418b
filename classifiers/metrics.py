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
"""The modality shortcut's figures, where the data knows each image's modality and each class's preferred one."""
MARKER_NAMES = ("marker_accuracy_agree", "marker_accuracy_conflict", "marker_gap")
"""The marker shortcut's figures, where each image's marker is known (synthrad's ``shortcut=marker``)."""
WORST_GROUP = "worst_group_accuracy"
GROUP_NAMES = (*SHORTCUT_NAMES, *MARKER_NAMES, WORST_GROUP)
"""Every figure of :func:`shortcut_metrics`."""
SCALAR_METRICS = ("loss", *METRIC_NAMES, *GROUP_NAMES)
"""Every scalar an evaluation may report (``loss`` and the shortcut metrics where the data allows)."""
_NAMES = {"modality": SHORTCUT_NAMES, "marker": MARKER_NAMES}


def _accuracy(correct: np.ndarray, where: np.ndarray) -> float:
    return float(correct[where].mean()) if where.any() else float("nan")


def shortcut_metrics(labels: np.ndarray, pred: np.ndarray, agreement: dict[str, np.ndarray]) -> dict[str, float]:
    """Per shortcut, the accuracy on images whose cue agrees with their class, on the others (the shortcut-conflicting
    images), and the **gap** between them (agreeing - conflicting): for the modality ``accuracy_preferred``,
    ``accuracy_other`` and ``shortcut_gap``; for the marker ``marker_accuracy_agree``, ``marker_accuracy_conflict`` and
    ``marker_gap``. A classifier that reads the class from the content alone has gaps near 0; one that leans on a cue
    is right more often where cue and class agree. And ``worst_group_accuracy``: the lowest accuracy over the groups
    of images that agree or conflict alike on every shortcut given (Sagawa et al. 2020's worst group; with one
    shortcut, the conflicting images).

    Args:
        labels: true classes, shape (N,).
        pred: predicted classes, shape (N,).
        agreement: per shortcut (``modality``, ``marker``), whether each image's cue agrees with its class, (N,) bool.
    A group with no image gives NaN for its accuracy and the gap; the worst group is taken over non-empty groups.
    """
    correct = np.asarray(labels) == np.asarray(pred)
    out: dict[str, float] = {}
    pattern = np.zeros(len(correct), dtype=np.int64)
    for i, (kind, agrees) in enumerate(agreement.items()):
        agrees = np.asarray(agrees, dtype=bool)
        pattern |= agrees.astype(np.int64) << i
        on, off, gap = _NAMES[kind]
        out[on], out[off] = _accuracy(correct, agrees), _accuracy(correct, ~agrees)
        out[gap] = out[on] - out[off]
    groups = [_accuracy(correct, pattern == g) for g in np.unique(pattern)]
    out[WORST_GROUP] = float(min(groups)) if groups else float("nan")
    return out


def classification_metrics(labels: np.ndarray, probs: np.ndarray, agreement: dict[str, np.ndarray] | None = None
                           ) -> dict[str, object]:
    """Accuracy, balanced accuracy, macro precision/recall/F1, one-vs-rest macro ROC AUC, confusion matrix, and,
    given ``agreement``, the shortcut metrics (:func:`shortcut_metrics`).

    Args:
        labels: true classes, shape (N,).
        probs: predicted class probabilities, shape (N, K).
        agreement: per shortcut, whether each image's cue agrees with its class (:func:`shortcut_metrics`), or None.
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
    shortcut = shortcut_metrics(labels, pred, agreement) if agreement else {}
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
