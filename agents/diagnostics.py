"""What a mask policy learned, read off a fixed probe batch: learning told apart from drift.

A policy's concentrations can move without learning anything: in the paper's ``exp`` parameterisation the
moving-average base follows the head's batch mean, so a head that outputs about 0 pulls every cell toward
Beta(1, 1) whatever the reward. The statistics below separate the two. They are computed on the same
held-out, unaugmented images (the *probe*: the first ``PROBE_SIZE`` validation images) at every logging step, from
the policy's per-cell Beta without sampling, so they are deterministic functions of the policy's weights.

With ``mu[i, c] = alpha / (alpha + beta)``, the mean mask value of image ``i``'s cell ``c``:

- ``kl_uniform``: mean over images and cells of KL(policy || Beta(1, 1)); 0 for the uniform mask.
- ``kl_initial``: mean over images and cells of KL(policy || the same policy at step 0). Drift and learning
  both raise it; read it beside the rest.
- ``mask_mean``: mean of ``mu``: how much of the image the policy expects to keep on the probe, before any mask
  budget (the runner's ``mask/mean`` is the other view: the grids the classifier trained on, as applied).
- ``image_spread``: the spread across images of each cell's ``mu`` (standard deviation over images, mean over
  cells): 0 for a policy that ignores the image, which drift alone leaves at exactly 0 when the head ignores
  the image.
- ``cell_spread``: the spread across cells of the image-averaged ``mu`` (a fixed spatial pattern).
- Where the data knows each pixel's region (synthrad: background, anatomy, lesion, marker), the *expected* mask
  (the blurred upsampled ``mu``: masks are linear in the grid) averaged over each region's pixels,
  ``mask_on_background``, ``mask_on_anatomy``, ``mask_on_lesion``; ``content_gap``, its mean on anatomy and
  lesion pixels minus its mean on the background (negative: the content is dimmed more than the background);
  ``content_gap_mean_mask``, the same for the image-averaged mask laid on every image (what a fixed pattern,
  such as a dark centre, explains); and ``content_gap_image_specific``, the difference: the part of the gap
  that only a mask following each image's content gives.
- Where the images carry a marker (synthrad's marker shortcut), ``mask_on_marker`` and ``marker_gap``, the expected mask
  on the marker's pixels minus its mean on every other pixel (negative: the marker is hidden more than the rest);
  ``marker_gap_mean_mask`` and ``marker_gap_image_specific`` split it as for the content. The marker sits at a
  different corner per image, so hiding it takes an image-specific mask.

An agent whose masks are not drawn from a Beta (``saliency-mask``) has only an expected grid
(``Agent.expected_grid``): it gets the statistics of ``mu`` and the regions, not the KL divergences.

The runner also draws the probe in TensorBoard (``agents.mask_figure``): per class, an image, its expected mask
(:func:`expected_masks`), a masked image, and :func:`mean_mask_per_class` against the mean over the probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributions import Beta, kl_divergence

from classifiers.data import DataSpec, ImageDataset
from classifiers.synthrad import REGIONS
from envs.masks import NoiseMask

PROBE_SIZE = 64
"""Validation images in the probe batch: enough for every class of a 12-class task a few times."""


@dataclass
class Probe:
    """The fixed, unaugmented images the diagnostics are computed on."""

    images: torch.Tensor
    """uint8 (P, C, H, W) on the device."""
    labels: torch.Tensor
    """(P,) int64 on the device."""
    regions: torch.Tensor | None
    """(P, H, W) uint8 on the device (0 background, 1 anatomy, 2 lesion), where the data knows them."""
    num_classes: int


def make_probe(data: DataSpec, device: torch.device, size: int = PROBE_SIZE, split: str = "val") -> Probe:
    """The first ``size`` images of ``split``, as evaluation sees them (read from their files and resized where the
    data is a folder), with their region maps where the data has them at this size."""
    source = data.splits[split]
    n = min(size, len(source))
    dataset = ImageDataset(source, data.image_size, data.in_channels, train=False)
    images = torch.stack([dataset[i][0] for i in range(n)])
    regions = source.regions[:n] if source.regions is not None else None
    if regions is not None and regions.shape[-2:] != images.shape[-2:]:
        regions = None
    return Probe(images.to(device), torch.as_tensor(source.labels[:n], device=device),
                 regions.to(device) if regions is not None else None, data.num_classes)


def _region_mean(masks: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of ``masks`` (P, H, W) over the pixels where ``where`` is true, pooled over images (NaN if none)."""
    return (masks * where).sum() / where.sum()


GridMap = Callable[[torch.Tensor], torch.Tensor]


def _split_gap(expected: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor, name: str
               ) -> dict[str, torch.Tensor]:
    """``<name>``: the expected mask's mean inside minus outside; ``<name>_mean_mask``: the same for the image-averaged
    mask laid on every image; ``<name>_image_specific``: the difference."""
    gap = _region_mean(expected, inside) - _region_mean(expected, outside)
    fixed = expected.mean(0, keepdim=True)
    gap_fixed = _region_mean(fixed, inside) - _region_mean(fixed, outside)
    return {f"diagnostics/{name}": gap, f"diagnostics/{name}_mean_mask": gap_fixed,
            f"diagnostics/{name}_image_specific": gap - gap_fixed}


def policy_diagnostics(policy: Beta | torch.Tensor, probe: Probe, mask: NoiseMask, initial: Beta | None = None,
                       applied: GridMap | None = None) -> dict[str, torch.Tensor]:
    """The statistics of the module docstring for a policy on the probe images, as 0-d tensors.

    Args:
        policy: the per-cell Beta with batch shape (P, G, G) for ``probe.images``, or for masks not drawn from a Beta
            their expected grid (P, G, G) (the KL divergences are then left out).
        probe: the probe batch.
        mask: the environment's grid-to-mask operator (for the expected masks).
        initial: the policy's Beta on the same images at step 0 (None: ``kl_initial`` is left out).
        applied: what the environment does to a grid before applying it (its mask budget), used on the mean grid for
            the expected masks (None: nothing). Held at a budget, the mask is no longer linear in the grid, so the
            expected mask is then that of the mean grid, an approximation.
    """
    dist = policy if isinstance(policy, Beta) else None
    mu = _mean_grid(policy)
    out = {
        "diagnostics/mask_mean": mu.mean(),
        "diagnostics/image_spread": mu.std(0, correction=0).mean(),
        "diagnostics/cell_spread": mu.mean(0).std(correction=0),
    }
    if dist is not None:
        current = Beta(dist.concentration1.float(), dist.concentration0.float())
        uniform = Beta(torch.ones_like(current.concentration1), torch.ones_like(current.concentration0))
        out["diagnostics/kl_uniform"] = kl_divergence(current, uniform).mean()
        if initial is not None:
            start = Beta(initial.concentration1.float(), initial.concentration0.float())
            out["diagnostics/kl_initial"] = kl_divergence(current, start).mean()
    if probe.regions is not None:
        expected = expected_masks(policy, mask, applied)[:, 0]
        regions = probe.regions
        background = regions == 0
        out |= {
            "diagnostics/mask_on_background": _region_mean(expected, background),
            "diagnostics/mask_on_anatomy": _region_mean(expected, regions == 1),
            "diagnostics/mask_on_lesion": _region_mean(expected, regions == 2),
        }
        out |= _split_gap(expected, (regions == 1) | (regions == 2), background, "content_gap")
        marker = regions == REGIONS.index("marker")
        if marker.any():
            out["diagnostics/mask_on_marker"] = _region_mean(expected, marker)
            out |= _split_gap(expected, marker, ~marker, "marker_gap")
    return out


def _mean_grid(policy: Beta | torch.Tensor) -> torch.Tensor:
    """Each cell's mean mask value ``mu`` (P, G, G) of a policy given as in :func:`policy_diagnostics`."""
    return (policy.mean if isinstance(policy, Beta) else policy).float()


def expected_masks(policy: Beta | torch.Tensor, mask: NoiseMask, applied: GridMap | None = None) -> torch.Tensor:
    """The expected mask of each image, (P, 1, H, W): the blurred upsampled mean grid (masks are linear in the grid;
    held at a budget, the mask of the mean grid, an approximation). ``policy`` and ``applied`` as in
    :func:`policy_diagnostics`."""
    mu = _mean_grid(policy)
    return mask(applied(mu) if applied is not None else mu)


def mean_mask_per_class(expected: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The expected masks (P, 1, H, W) of :func:`expected_masks` averaged over each class's images (``labels``,
    (P,)): (K, 1, H, W), zeros for a class with none."""
    out = expected.new_zeros(num_classes, *expected.shape[1:])
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(expected.dtype)
    out.index_add_(0, labels, expected)
    return out / counts.view(-1, 1, 1, 1)
