"""The blend operator: a mask that mixes each image with a restyled copy of itself, keeping its anatomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from agents.registry import environment_for
from classifiers.data import load_dataset
from classifiers.train import Normalizer
from envs.core import EnvConfig, PretrainCore
from envs.masks import NoiseMask, random_style

DATA = "synthrad?n_train=600&n_val=24&n_test=300"


def _style_features(x: torch.Tensor) -> np.ndarray:
    """What tells the modalities apart without the anatomy: each image's intensity histogram (12 bins of its
    standardised values) and its high-frequency energy (neighbour differences over the variance)."""
    x = x[:, 0]
    std = x.std((1, 2), keepdim=True)
    z = ((x - x.mean((1, 2), keepdim=True)) / (std + 1e-6)).flatten(1)
    hist = torch.stack([((z >= lo) & (z < lo + 0.5)).float().mean(1) for lo in np.arange(-3.0, 3.0, 0.5)], 1)
    energy = ((x[:, 1:] - x[:, :-1]) ** 2).mean((1, 2)) / (std[:, 0, 0] ** 2 + 1e-6)
    return torch.cat([hist, energy[:, None]], 1).numpy()


def _edges(x: torch.Tensor) -> torch.Tensor:
    gx, gy = x[:, 0, 1:, 1:] - x[:, 0, 1:, :-1], x[:, 0, 1:, 1:] - x[:, 0, :-1, 1:]
    e = (gx**2 + gy**2).sqrt().flatten(1)
    return e - e.mean(1, keepdim=True)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())


def test_the_restyling_keeps_the_anatomy_and_takes_the_modality_style_away() -> None:
    """On 300 test images: a modality probe on style statistics (logistic regression on intensity histograms and
    high-frequency energy, trained on 600 clean images) reads the modality from clean images well above chance (1/3)
    and falls toward chance on restyled ones; the restyled images keep their own edges (the edge maps correlate with
    their originals several times more than with another image's), and the anatomy still stands apart from the
    background."""
    data = load_dataset(DATA, image_size=32)
    normalise = Normalizer()
    train, test = (normalise(data.splits[s].images) for s in ("train", "test"))
    probe = LogisticRegression(max_iter=5000, C=10).fit(_style_features(train), data.splits["train"].modality)
    modality = data.splits["test"].modality
    torch.manual_seed(0)
    styled = random_style(test)
    clean_accuracy, styled_accuracy = (probe.score(_style_features(x), modality) for x in (test, styled))
    assert clean_accuracy > 0.65 and styled_accuracy < 0.55, (clean_accuracy, styled_accuracy)

    own, other = _correlation(_edges(styled), _edges(test)), _correlation(_edges(styled), _edges(test.roll(1, 0)))
    assert own > 0.25 and own > 3 * other, (own, other)
    regions = data.splits["test"].regions
    separation = [float((x[0][r == 1].mean() - x[0][r == 0].mean()).abs() / x[0].std())
                  for x, r in zip(styled, regions)]
    assert np.mean(separation) > 0.5
    assert torch.allclose(styled.mean((1, 2, 3)), test.mean((1, 2, 3)), atol=1e-4)  # the image's own level
    assert torch.allclose(styled.std((1, 2, 3)), test.std((1, 2, 3)), rtol=1e-3)


def test_the_field_decides_where_the_style_is_replaced() -> None:
    """``M * x + (1 - M) * S(x)``: an all-ones grid gives the image, all zeros its restyled copy, a constant c the
    mix at c; each image draws its own style (from the generator given)."""
    op = NoiseMask(16, 4, 5, 2.0)
    x = torch.randn(3, 1, 16, 16)
    styled = random_style(x, torch.Generator().manual_seed(1))
    assert torch.equal(styled, random_style(x, torch.Generator().manual_seed(1)))
    assert not torch.allclose(styled[0], styled[1] * x[0].std() / x[1].std())
    assert torch.allclose(op.apply(x, torch.ones(3, 4, 4), styled), x, atol=1e-6)
    assert torch.allclose(op.apply(x, torch.zeros(3, 4, 4), styled), styled, atol=1e-6)
    assert torch.allclose(op.apply(x, torch.full((3, 4, 4), 0.3), styled), 0.3 * x + 0.7 * styled, atol=1e-5)
    assert torch.allclose(op.apply(x, torch.full((3, 4, 4), 0.3)), 0.3 * x, atol=1e-6)


def test_the_environment_blends_under_mask_op_blend() -> None:
    """The core trains on the blend under ``mask_op="blend"`` (an all-ones grid leaves the images as they are, an
    all-zeros one restyles them: same mean and spread, other pixels), and ``uniform-blend`` is ``uniform-mask`` with
    it; an unknown operator is refused in one line."""
    env = EnvConfig(dataset="synthrad?n_train=64&n_val=24&n_test=24", image_size=16, grid=4, blur_kernel=5,
                    blur_sigma=2.0, batch_size=8, device="cpu", mask_op="blend")
    core = PretrainCore(env)
    images = core.reset(seed=0)
    clean = core.inputs(images)
    assert torch.allclose(core.inputs(images, torch.ones(8, 4, 4)), clean, atol=1e-6)
    restyled = core.inputs(images, torch.zeros(8, 4, 4))
    assert not torch.allclose(restyled, clean, atol=0.1)
    assert torch.allclose(restyled.mean((1, 2, 3)), clean.mean((1, 2, 3)), atol=1e-4)
    assert environment_for("uniform-blend", EnvConfig()).mask_op == "blend"
    assert environment_for("uniform-mask", EnvConfig()).mask_op == "multiply"
    with pytest.raises(ValueError, match="unknown mask_op 'add'; use one of multiply, blend"):
        EnvConfig(mask_op="add").validate()
