"""Noise-mask operations: separable Gaussian blur against torchvision, nearest upsampling, argument checks."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import functional as TF

from envs.masks import NoiseMask, check_blur, gaussian_blur, gaussian_kernel1d, hold_mean


@pytest.mark.parametrize(
    ("kernel", "sigma", "shape"),
    [(3, 0.8, (2, 1, 16, 16)), (5, 1.5, (3, 3, 20, 24)), (13, 6.0, (2, 1, 32, 32)), (9, 3.0, (1, 2, 17, 31)),
     (1, 1.0, (2, 1, 8, 8))],
)
def test_blur_matches_torchvision(kernel: int, sigma: float, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(kernel)
    x = torch.rand(shape, generator=g) * 4 - 2
    ours = gaussian_blur(x, gaussian_kernel1d(kernel, sigma))
    ref = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_kernel_is_normalised_and_symmetric() -> None:
    k = gaussian_kernel1d(13, 6.0)
    assert k.shape == (13,) and abs(float(k.sum()) - 1.0) < 1e-6
    assert torch.equal(k, k.flip(0)) and int(k.argmax()) == 6


def test_upsample_is_nearest() -> None:
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(3, 8, 8, generator=g)
    mask = NoiseMask(32, 8, blur_kernel=1)(grid)
    assert tuple(mask.shape) == (3, 1, 32, 32)
    for i in range(8):
        for j in range(8):
            block = mask[:, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            assert torch.equal(block, grid[:, i, j, None, None].expand_as(block))


def test_upsample_non_divisible_grid_keeps_values() -> None:
    grid = torch.arange(25, dtype=torch.float32).view(1, 5, 5) / 25
    mask = NoiseMask(32, 5, blur_kernel=1)(grid)
    assert set(mask.unique().tolist()) == set(grid.unique().tolist())


def test_all_ones_grid_leaves_image_unchanged() -> None:
    x = torch.randn(4, 3, 32, 32)
    nm = NoiseMask(32, 8, blur_kernel=13, blur_sigma=6.0)
    mask = nm(torch.ones(4, 8, 8))
    torch.testing.assert_close(mask, torch.ones_like(mask), atol=1e-6, rtol=0)
    torch.testing.assert_close(nm.apply(x, torch.ones(4, 8, 8)), x, atol=1e-5, rtol=0)


def test_apply_multiplies_each_image_by_its_own_mask() -> None:
    x = torch.randn(2, 1, 16, 16)
    grid = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 0.5)])
    out = NoiseMask(16, 4, blur_kernel=5, blur_sigma=2.0).apply(x, grid)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1], 0.5 * x[1], atol=1e-6, rtol=0)


def test_blurred_mask_stays_in_unit_interval() -> None:
    grid = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = NoiseMask(32, 8)(grid)
    assert float(mask.min()) >= -1e-6 and float(mask.max()) <= 1 + 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blur_kernel": 4}, "positive odd"),
        ({"blur_kernel": 0}, "positive odd"),
        ({"blur_kernel": 65}, "too large"),
        ({"blur_sigma": 0.0}, "sigma"),
        ({"grid": 33}, "grid 33"),
        ({"grid": 0}, "grid 0"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"image_size": 32, "grid": 8, "blur_kernel": 13, "blur_sigma": 6.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        NoiseMask(**args)


def test_largest_valid_kernel() -> None:
    check_blur(63, 6.0, 32)
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(gaussian_blur(x, gaussian_kernel1d(63, 6.0)),
                               TF.gaussian_blur(x, [63, 63], [6.0, 6.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("size", "grid", "kernel", "sigma"),
                         [(64, 16, 13, 6.0), (32, 5, 13, 6.0), (17, 3, 5, 1.5), (32, 8, 1, 1.0), (224, 64, 13, 6.0)])
def test_mask_operator_equals_upsample_then_blur(size: int, grid: int, kernel: int, sigma: float) -> None:
    """The one-matrix form ``A @ grid @ A.T`` is the step-by-step upsample and blur, also for grids that do
    not divide the image and without blur (then exactly)."""
    nm = NoiseMask(size, grid, blur_kernel=kernel, blur_sigma=sigma)
    g = torch.rand(3, grid, grid, generator=torch.Generator().manual_seed(size))
    ours, ref = nm(g), nm.reference(g)
    assert ours.shape == ref.shape == (3, 1, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=0 if kernel == 1 else 1e-5, rtol=0)


@pytest.mark.parametrize("budget", [0.1, 0.5, 0.9])
def test_hold_mean_sets_each_grids_mean_keeping_its_order(budget: float) -> None:
    """Each grid is scaled to mean ``budget`` (clipped at 1): values stay in [0, 1], the cells keep their order, and a
    grid already at the budget is left as it is."""
    g = torch.distributions.Beta(0.4, 0.6).sample((32, 8, 8)).clamp(1e-5, 1 - 1e-5)
    held = hold_mean(g, budget)
    assert torch.allclose(held.mean((1, 2)), torch.full((32,), budget), atol=1e-5)
    assert held.min() >= 0 and held.max() <= 1
    unclipped = held < 1
    ratio = held[unclipped] / g[unclipped]
    per_image = (held / g).where(unclipped, torch.nan)
    assert torch.allclose(ratio, per_image.nanmean((1, 2), keepdim=True).expand_as(g)[unclipped], rtol=1e-4)
    assert torch.allclose(hold_mean(held, budget), held, atol=1e-5)


def test_hold_mean_of_a_constant_grid_is_the_budget() -> None:
    assert torch.allclose(hold_mean(torch.full((2, 4, 4), 0.9), 0.3), torch.full((2, 4, 4), 0.3))
    assert torch.allclose(hold_mean(torch.full((1, 4, 4), 1e-5), 0.7), torch.full((1, 4, 4), 0.7), atol=1e-5)
