"""The evaluation's figures: the expected calibration error by hand, figures that name the classes, and a fine-tuning
run that writes the three PNGs, their TensorBoard images and ``ece`` in metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from classifiers.figures import (
    FIGURES,
    confusion_matrix_figure,
    expected_calibration_error,
    roc_figure,
    write_figures,
)
from classifiers.finetune import FinetuneConfig, finetune


def test_ece_by_hand() -> None:
    # Top-class confidences 0.9 and 0.88 (both right) share the bin (13/15, 14/15]; 0.82 (wrong), 0.7 (right) and
    # 0.55 (wrong) are alone in theirs: ECE = (2 * |1 - 0.89| + |0 - 0.82| + |1 - 0.7| + |0 - 0.55|) / 5.
    probs = np.array([[0.9, 0.1], [0.88, 0.12], [0.82, 0.18], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1, 1])
    assert expected_calibration_error(labels, probs) == pytest.approx((2 * 0.11 + 0.82 + 0.3 + 0.55) / 5)
    # Three of four right at confidence 0.75: calibrated
    assert expected_calibration_error(np.array([0, 0, 0, 1]), np.tile([0.75, 0.25], (4, 1))) == pytest.approx(0.0)


def test_figures_name_the_classes() -> None:
    names = ["brain-none", "brain-nodule", "chest-streak"]
    labels = np.array([0, 0, 1, 1, 0, 1])  # no chest-streak image: it gets no ROC curve
    probs = np.random.default_rng(0).dirichlet(np.ones(3), len(labels))
    ax = confusion_matrix_figure(labels, probs, names).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    legend = [t.get_text() for t in roc_figure(labels, probs, names).legends[0].get_texts()]
    assert [t.split(" (AUC")[0] for t in legend] == ["brain-none", "brain-nodule", "chance"]


def test_a_split_of_one_class_gets_its_figures(tmp_path: Path) -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(3), 4)
    paths = write_figures(tmp_path, np.zeros(4, dtype=np.int64), probs, ["a", "b", "c"])
    assert [p.name for p in paths] == [f"{name}.png" for name in FIGURES] and all(p.is_file() for p in paths)


def test_finetuning_writes_the_figures_and_the_ece(tmp_path: Path) -> None:
    run_dir = finetune(FinetuneConfig(dataset="synthrad:unseen?n_train=48&n_val=24&n_test=24", image_size=16,
                                      epochs=1, batch_size=8, device="cpu", run_dir=str(tmp_path / "ft")))
    for name in FIGURES:
        assert (run_dir / f"{name}.png").stat().st_size > 0, name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["ece"] <= 1.0
    events = EventAccumulator(str(run_dir), size_guidance={IMAGES: 0}).Reload()
    assert set(events.Tags()[IMAGES]) == {f"test/{name}" for name in FIGURES}
    image = events.Images("test/confusion_matrix")[-1]
    assert image.step == metrics["steps"] and image.width > 100 and image.height > 100
