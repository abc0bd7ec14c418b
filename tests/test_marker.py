"""The marker shortcut: a local class-coded token in synthrad, measured like the modality shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from agents.diagnostics import Probe, policy_diagnostics
from agents.study import balanced_target, target_label
from classifiers.data import DataError, load_dataset
from classifiers.metrics import shortcut_metrics
from classifiers.synthrad import REGIONS, SynthRadConfig, generate_split, marker_codes
from envs.masks import NoiseMask

MARKER = "synthrad?n_train=1200&n_val=24&n_test=1200&shortcut=marker"
MARKER_REGION = REGIONS.index("marker")


def test_the_default_is_the_same_bit_for_bit_and_keeps_its_cache_key() -> None:
    """The marker options change nothing of the modality shortcut's data: not its images, regions or key (so caches
    written before the marker existed are still used). ``both`` draws the same images as the default and only paints
    the markers over them."""
    default = generate_split(SynthRadConfig(image_size=32, n_train=60), "train", 60)
    other_bias = generate_split(SynthRadConfig(image_size=32, n_train=60, marker_bias=0.2), "train", 60)
    assert all(np.array_equal(default[k], other_bias[k]) for k in default) and "marker" not in default
    assert SynthRadConfig().key() == "482b1ef9c02864b3" == SynthRadConfig(marker_bias=0.5).key()
    assert SynthRadConfig(shortcut="marker").key() != SynthRadConfig(shortcut="marker", marker_bias=0.5).key()

    both = generate_split(SynthRadConfig(image_size=32, n_train=60, shortcut="both"), "train", 60)
    outside = both["regions"] != MARKER_REGION
    assert np.array_equal(both["labels"], default["labels"]) and np.array_equal(both["modality"], default["modality"])
    assert np.array_equal(both["images"][:, 0][outside], default["images"][:, 0][outside])
    assert np.array_equal(both["regions"][outside], default["regions"][outside])


def _marker_box(region: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(region == MARKER_REGION)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def test_each_marker_is_a_square_at_a_corner_that_spells_its_class() -> None:
    """Every image has one marker: a square a quarter of the image wide, at one of the four corners (all four used),
    whose 2 x 2 inner cells read back, bright as 1, as the bits of the class it spells plus one."""
    data = load_dataset("synthrad?n_train=240&n_val=24&n_test=24&shortcut=marker", image_size=32)
    train = data.splits["train"]
    images, regions = train.images[:, 0].numpy(), train.regions.numpy()
    corners = set()
    for image, region, spelled in zip(images, regions, train.marker):
        top, bottom, left, right = _marker_box(region)
        assert (bottom - top, right - left) == (8, 8) and (region == MARKER_REGION).sum() == 64
        corners.add((top < 16, left < 16))
        square = image[top:bottom, left:right]
        cells = square[1:7, 1:7].reshape(2, 3, 2, 3).mean((1, 3)) > 127  # 1 px frame, 3 px cells
        assert np.array_equal(cells, marker_codes(12)[spelled].astype(bool))
        assert (square[0] == 255).all() and (square[:, 0] == 255).all()
    assert corners == {(True, True), (True, False), (False, True), (False, False)}
    assert len({tuple(c.flatten()) for c in marker_codes(12)}) == 12 and marker_codes(12).reshape(12, 4).any(1).all()


def test_markers_agree_with_the_class_at_the_bias_and_the_shifted_split_draws_them_independently() -> None:
    """With ``shortcut=marker`` the marker spells the image's class 90% of the time and the modality is independent of
    the class; on the shifted split (1,200 images) the marker spells its class 1 time in 12 and no more (chi-squared
    test of class against marker)."""
    data = load_dataset(MARKER, image_size=16)
    assert data.shortcuts == ("marker",)
    agreement = data.shortcut_agreement("test")
    assert set(agreement) == {"marker"} and abs(agreement["marker"].mean() - 0.9) < 0.03  # 3.5 sd at n = 1200
    test = data.splits["test"]
    assert abs((test.modality == data.preferred_modality[test.labels]).mean() - 1 / 3) < 0.045

    shifted = load_dataset(MARKER.replace("synthrad", "synthrad:shifted"), image_size=16)
    test = shifted.splits["test"]
    assert abs(shifted.shortcut_agreement("test")["marker"].mean() - 1 / 12) < 0.03
    table = np.array([np.bincount(test.marker[test.labels == c], minlength=12) for c in range(12)])
    assert chi2_contingency(table).pvalue > 0.001, table

    both = load_dataset(MARKER.replace("marker", "both"), image_size=16)
    assert both.shortcuts == ("modality", "marker") and set(both.shortcut_agreement("test")) == {"modality", "marker"}
    assert load_dataset("synthrad?n_train=24&n_val=24&n_test=24", image_size=16).shortcuts == ("modality",)


@pytest.mark.parametrize(("option", "message"), [
    ("shortcut=token", "unknown synthrad shortcut 'token'; use one of modality, marker, both"),
    ("shortcut=marker&marker_bias=1.5", "marker_bias=1.5 must lie in"),
    ("marker_bias=high", "option marker_bias='high' is not a number"),
])
def test_bad_marker_options_are_refused_in_one_line(option: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(f"synthrad?n_train=24&{option}", image_size=16)
    with pytest.raises(DataError, match="too small for a marker"):
        load_dataset("synthrad?n_train=24&shortcut=marker", image_size=12)


def test_shortcut_metrics_for_the_marker_and_the_worst_group() -> None:
    """Ten images: the marker agrees on the first six (five right), conflicts on the other four (one right); the
    modality agrees on the even ones. The worst group is the lowest accuracy over the four agreement patterns."""
    labels = np.zeros(10, int)
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 1])
    marker = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    modality = np.arange(10) % 2 == 0
    m = shortcut_metrics(labels, pred, {"marker": marker})
    assert (m["marker_accuracy_agree"], m["marker_accuracy_conflict"]) == pytest.approx((5 / 6, 1 / 4))
    assert m["marker_gap"] == pytest.approx(5 / 6 - 1 / 4) and m["worst_group_accuracy"] == pytest.approx(1 / 4)
    both = shortcut_metrics(labels, pred, {"modality": modality, "marker": marker})
    # groups (modality, marker): agree/agree 0,2,4 all right; conflict/agree 1,3,5: 2 of 3; agree/conflict 6,8: 1
    # of 2; conflict/conflict 7,9: none right
    assert both["worst_group_accuracy"] == 0.0 and both["shortcut_gap"] == pytest.approx(4 / 5 - 2 / 5)
    assert set(both) >= {"accuracy_preferred", "marker_gap"}


def test_the_diagnostics_see_a_mask_that_hides_the_marker() -> None:
    """An expected grid that dims the cells under each image's marker (and nothing else) gives a negative marker gap,
    nearly all of it image-specific (the markers sit at different corners); one that dims a fixed corner gives a gap
    that the image-averaged mask explains. No Beta: the KL divergences are left out."""
    data = load_dataset("synthrad?n_train=24&n_val=64&n_test=24&shortcut=marker", image_size=32)
    val = data.splits["val"]
    regions = val.regions
    probe = Probe(val.images, torch.as_tensor(val.labels), regions, 12)
    op = NoiseMask(32, 8, 5, 2.0)
    on_marker = torch.nn.functional.avg_pool2d((regions == MARKER_REGION).float()[:, None], 4)[:, 0] > 0
    follows = torch.where(on_marker, 0.0, 1.0)
    d = policy_diagnostics(follows, probe, op)
    assert d["diagnostics/marker_gap"] < -0.4 and d["diagnostics/marker_gap_image_specific"] < -0.3
    assert "diagnostics/kl_uniform" not in d
    fixed = torch.ones(64, 8, 8)
    fixed[:, :4, :4] = 0.0
    d = policy_diagnostics(fixed, probe, op)
    assert abs(d["diagnostics/marker_gap_image_specific"]) < 1e-5


def test_the_study_balances_and_names_the_marker() -> None:
    spec = "synthrad?n_train=2000&shortcut=marker&marker_bias=0.9"
    assert balanced_target(spec) == "synthrad?n_train=2000&shortcut=marker&modality_bias=0.3333&marker_bias=0.0833"
    assert balanced_target("synthrad?modality_bias=0.3333") == "synthrad?modality_bias=0.3333"
    assert target_label(spec + "@10") == "synthrad (shortcut marker, marker_bias 0.9) (K=10)"
