"""The pictures of a classifier's evaluation: confusion matrix, ROC curves per class, reliability diagram.

Numbers alone do not say which classes a model confuses, at what operating point it separates each class, or
whether its confidence can be taken at its word; these three figures do. Each function builds one matplotlib
``Figure`` from the labels and predicted probabilities of an evaluation (``classifiers.train.predict``), with the
classes named; :func:`write_figures` writes all three as PNG files and, given a run's logger, to TensorBoard.

The figures are made without pyplot and drawn by matplotlib's Agg renderer (PNG files and TensorBoard's images), so
building them needs no display and leaves the process's matplotlib backend as it was (a notebook that imports this
module keeps its inline plots).

Calibration is read on the top class, the standard reliability diagram (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017): per bin of the predicted class's probability (the confidence), the share of images whose
prediction is right. :func:`expected_calibration_error` is the count-weighted mean gap between the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.calibration import calibration_curve
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

if TYPE_CHECKING:
    from classifiers.runlog import RunLogger

ECE_BINS = 15
"""Equal-width bins over the top-class confidence for the ECE and the reliability diagram (Guo et al.'s 15)."""
VALUES_UP_TO = 20
"""The confusion matrix prints its counts in the cells up to this many classes; beyond, the colours alone are read."""
LEGEND_ROWS = 30
"""Entries per column of the ROC figure's legend (one per class, and the chance line)."""
FIGURES = ("confusion_matrix", "roc_curves", "reliability")
"""The figures :func:`write_figures` writes: ``<name>.png`` in the folder, ``<split>/<name>`` in TensorBoard."""


def top_class(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The confidence (probability of the predicted class) and whether the prediction is right, per image."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs.max(1), (probs.argmax(1) == np.asarray(labels)).astype(np.int64)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """The expected calibration error of the top class: ``sum_b n_b / n * |accuracy_b - confidence_b|`` over
    ``bins`` equal-width bins ``((b - 1) / bins, b / bins]`` of the confidence (the binning of scikit-learn's
    ``calibration_curve``, so the ECE and the reliability diagram read the same bins).

    Args:
        labels: true classes, shape (N,).
        probs: predicted class probabilities, shape (N, K).
        bins: number of bins.
    """
    confidence, correct = top_class(labels, probs)
    if len(confidence) == 0:
        raise ValueError("the ECE needs at least one image; evaluate on a non-empty split")
    which = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], confidence)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / count.sum())


def confusion_matrix_figure(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Figure:
    """True against predicted class, counts per cell (scikit-learn's ``ConfusionMatrixDisplay``)."""
    k = len(class_names)
    side = min(30.0, max(5.0, 0.45 * k + 2.5))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(labels), np.asarray(probs).argmax(1), labels=np.arange(k), display_labels=list(class_names),
        include_values=k <= VALUES_UP_TO, xticks_rotation="vertical", cmap="Blues", ax=ax)
    ax.set_title(f"Confusion matrix ({len(labels)} images)")
    return fig


def roc_figure(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve of every class present among ``labels`` alongside others (scikit-learn's
    ``RocCurveDisplay``, which names each with its AUC); a class with no image, or only images, has no curve."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    shown = [c for c in range(len(class_names)) if 0 < (labels == c).sum() < len(labels)]
    columns = math.ceil((len(shown) + 1) / LEGEND_ROWS)
    # inches: the square plot with its labels, and per legend column a line, the name and its " (AUC = 0.00)"
    column = 0.6 + 0.07 * (max((len(class_names[c]) for c in shown), default=6) + 14)
    fig = Figure(figsize=(7.0 + column * columns, 6.0), layout="constrained")
    ax = fig.subplots()
    for c in shown:
        RocCurveDisplay.from_predictions(labels == c, probs[:, c], name=class_names[c], ax=ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    missing = len(class_names) - len(shown)
    ax.set_title("ROC curves, each class against the rest" + (f" ({missing} classes without a curve: no image of "
                                                                "the class, or only such images)" if missing else ""))
    if ax.get_legend() is not None:  # scikit-learn's, inside the axes: the figure's goes beside them
        ax.get_legend().remove()
    fig.legend(loc="outside right center", fontsize="small", ncols=columns)
    return fig


def reliability_figure(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> Figure:
    """Accuracy against top-class confidence per bin (scikit-learn's ``calibration_curve``) with the diagonal of a
    calibrated model and the ECE in the title; below, how many images fall in each bin."""
    confidence, correct = top_class(labels, probs)
    accuracy, mean_confidence = calibration_curve(correct, np.clip(confidence, 0.0, 1.0), n_bins=bins,
                                                  strategy="uniform")
    fig = Figure(figsize=(6.0, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    top.plot(mean_confidence, accuracy, marker="o", label="model")
    top.set_ylabel("accuracy (share of right predictions)")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(f"Reliability of the predicted class (ECE {expected_calibration_error(labels, probs, bins):.3f}, "
                  f"{bins} bins)")
    bottom.hist(confidence, bins=np.linspace(0.0, 1.0, bins + 1), color="tab:blue", edgecolor="white")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return fig


def draw(fig: Figure) -> np.ndarray:
    """The figure drawn by matplotlib's Agg renderer at its own size and dpi: RGB uint8 (H, W, 3)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_figures(folder: str | Path, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                  logger: RunLogger | None = None, step: int = 0, split: str = "test") -> list[Path]:
    """Write the three figures of one evaluation as ``<folder>/<name>.png`` (:data:`FIGURES`) and, with ``logger``,
    as TensorBoard images ``<split>/<name>`` at ``step``; return the PNG paths."""
    figures = {"confusion_matrix": confusion_matrix_figure(labels, probs, class_names),
               "roc_curves": roc_figure(labels, probs, class_names),
               "reliability": reliability_figure(labels, probs)}
    paths = []
    for name, fig in figures.items():
        rgb = draw(fig)  # once, for the file and TensorBoard alike
        path = Path(folder) / f"{name}.png"
        Image.fromarray(rgb).save(path)
        paths.append(path)
        if logger is not None:
            logger.picture(step, f"{split}/{name}", rgb)
    return paths
