"""The non-learned agents: the torchvision augmentations (per image, on the right side of normalisation,
reproducible) and the uniform mask."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pretrain
import pytest
import torch

from agents.baselines import RandomErasing, TrivialAugment, UniformMask
from agents.policy import cell_beta
from agents.registry import make_agent


def batch(n: int = 16, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_random_erasing_erases_a_rectangle_of_zeros_per_image_on_the_normalised_batch() -> None:
    agent = make_agent("random-erasing", {"erase_p": 1.0})
    assert isinstance(agent, RandomErasing)
    x = torch.randn(16, 1, 32, 32) + 5.0  # no zeros before erasing
    torch.manual_seed(0)
    action = agent.act(batch())
    assert action.grid is None and action.augment is None
    erased = action.perturb(x) == 0
    assert erased.any((1, 2, 3)).all()  # every image, with p = 1
    boxes = {tuple(e[0].nonzero().min(0).values.tolist() + e[0].nonzero().max(0).values.tolist()) for e in erased}
    assert len(boxes) > 1  # drawn per image, not once for the batch
    for e in erased:  # a filled rectangle
        (r0, c0), (r1, c1) = e[0].nonzero().min(0).values, e[0].nonzero().max(0).values
        assert e[0, r0:r1 + 1, c0:c1 + 1].all() and e.sum() == (r1 - r0 + 1) * (c1 - c0 + 1)
    with pytest.raises(ValueError, match="erase_p"):
        RandomErasing(erase_p=1.5)


def test_trivial_augment_changes_uint8_images_independently_and_reproducibly() -> None:
    agent = make_agent("trivial-augment", {})
    assert isinstance(agent, TrivialAugment)
    images = batch(32)
    torch.manual_seed(1)
    first = agent.act(images).augment(images)
    torch.manual_seed(1)
    again = agent.act(images).augment(images)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, again)
    changed = (first != images).flatten(1).any(1)
    assert 0 < int(changed.sum()) < 32 or changed.all()  # per image: some ops (identity, small shifts) may not show


@pytest.mark.parametrize("algo", ["random-erasing", "trivial-augment"])
def test_pretraining_with_an_augmentation_reports_it_as_the_perturbation(algo: str, tmp_path: Path) -> None:
    run = tmp_path / algo
    argv = ["--algo", algo, "--dataset", "synthrad?n_train=96&n_val=24&n_test=24", "--image-size", "32", "--grid", "8",
            "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "16", "--max-steps", "3", "--device", "cpu",
            "--run-dir", str(run)]
    assert pretrain.main(argv) == 0
    figures = json.loads((run / "heated_metrics.json").read_text())
    assert figures["heated/test/loss"] != figures["heated/test_perturbed/loss"]
    assert not any(k.startswith("diagnostics/") for k in figures)  # no mask policy to diagnose


def test_the_uniform_mask_draws_its_cells_from_the_uniform_law_a_beta_1_1_gives() -> None:
    """Beta(1, 1) is drawn as one uniform number per cell (not two Gamma draws): the same law, a smaller last batch
    included, reproducible from the seed, independent across cells."""
    from scipy import stats

    agent = UniformMask()
    agent.core = SimpleNamespace(cfg=SimpleNamespace(grid=4))
    sizes = [16, 16, 5, 16]
    torch.manual_seed(0)
    grids = [agent.act(batch(n)).grid for n in sizes]
    torch.manual_seed(0)
    assert all(torch.equal(g, agent.act(batch(n)).grid) for g, n in zip(grids, sizes))
    assert [g.shape for g in grids] == [(n, 4, 4) for n in sizes]
    draws = torch.cat([agent.act(batch(256)).grid for _ in range(8)])  # 32,768 cells
    assert 0.0 <= float(draws.min()) and float(draws.max()) < 1.0
    assert stats.kstest(draws.flatten().numpy(), "uniform").pvalue > 0.01
    beta_draws = agent.mask_distribution(batch(256)).sample((8,)).flatten().numpy()  # what Beta(1, 1) itself draws
    assert stats.ks_2samp(draws.flatten().numpy(), beta_draws).pvalue > 0.01
    neighbours = torch.corrcoef(torch.stack([draws[:, 0, 0], draws[:, 0, 1]]))[0, 1]
    assert abs(float(neighbours)) < 0.05


def test_a_non_uniform_beta_mask_draws_what_a_fresh_beta_per_batch_draws() -> None:
    """Other concentrations draw from the Beta itself, built once per batch size and reused: the grids are those of a
    Beta built anew for every batch from the same generator, a smaller last batch included."""
    agent = UniformMask(alpha=2.0, beta=0.5)
    agent.core = SimpleNamespace(cfg=SimpleNamespace(grid=4))
    sizes = [16, 16, 5, 16]
    torch.manual_seed(0)
    grids = [agent.act(batch(n)).grid for n in sizes]
    torch.manual_seed(0)
    expected = [cell_beta(torch.full((n, 4, 4), 2.0), torch.full((n, 4, 4), 0.5)).sample() for n in sizes]
    assert [g.shape for g in grids] == [(n, 4, 4) for n in sizes]
    assert all(torch.equal(g, e) for g, e in zip(grids, expected))
    assert agent.mask_distribution(batch(16)) is agent.mask_distribution(batch(16))  # built once, not per batch
