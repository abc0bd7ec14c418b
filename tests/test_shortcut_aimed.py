"""Perturbations aimed at the shortcut: the biased classifier's reward (``reinforce-lff``) and ``saliency-mask``."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from agents.baselines import SaliencyMask
from agents.registry import BUDGETED_ENV, LFF_ENV, environment_for, make_agent
from agents.runner import PretrainConfig, PretrainRunner
from classifiers.train import generalized_cross_entropy, supervised_step
from envs.core import EnvConfig, PretrainCore

TINY = "synthrad?n_train=64&n_val=24&n_test=24&shortcut=marker"


def tiny_env(**settings) -> EnvConfig:
    return EnvConfig(dataset=TINY, image_size=16, grid=4, blur_kernel=5, blur_sigma=2.0, batch_size=8, device="cpu",
                     precision="fp32", **settings)


def test_generalized_cross_entropy_weighs_the_gradient_by_p_to_the_q() -> None:
    """``(1 - p_y^q) / q``: its gradient is the cross-entropy's times ``p_y^q`` (LfF's emphasis on easy images)."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    p = logits.softmax(1).gather(1, labels[:, None])[:, 0]
    gce = generalized_cross_entropy(logits, labels, 0.7)
    assert torch.allclose(gce, (1 - p**0.7) / 0.7)
    (g_gce,) = torch.autograd.grad(gce.sum(), logits)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="none").sum(), logits)
    assert torch.allclose(g_gce, g_ce * p.detach()[:, None] ** 0.7, atol=1e-6)


def test_the_biased_reward_is_the_biased_classifiers_loss_and_leaves_the_training_alone() -> None:
    """Under ``reinforce-lff``'s settings each image's reward is the biased classifier's cross-entropy (eval mode) on
    its masked image minus the same under the second grid the agent gave (``bias_weight`` 0), the biased classifier
    takes its own generalised cross-entropy step on the masked batch, and the classifier trains exactly as under the
    adversarial reward: the same weights after three steps, bit for bit. Without a second grid the step is refused in
    one line."""
    biased = PretrainCore(tiny_env(**LFF_ENV))
    plain = PretrainCore(tiny_env(**BUDGETED_ENV))
    for core in (biased, plain):
        core.reset(seed=3)
    assert plain.biased is None and biased.biased is not None
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        grid = torch.rand(8, 4, 4, generator=generator)
        before = [p.clone() for p in biased.biased.parameters()]
        second = torch.rand(8, 4, 4, generator=generator)
        x, ref = biased.inputs(biased.images, grid), biased.inputs(biased.images, second)
        biased.biased.eval()
        with torch.no_grad():
            expected = (F.cross_entropy(biased.biased(x), biased.labels, reduction="none")
                        - F.cross_entropy(biased.biased(ref), biased.labels, reduction="none"))
        replica, train_copy = copy.deepcopy((biased.biased, biased.biased_optimizer))
        supervised_step(replica, train_copy, x, biased.labels, biased.dev,
                        criterion=lambda z, y: generalized_cross_entropy(z, y, 0.7))
        result = biased.step(grid, reference_grid=second)
        plain.step(grid)
        assert torch.allclose(result.reward, expected, atol=1e-5)
        assert result.biased_loss is not None and result.biased_correct.shape == (8,)
        assert any(not torch.equal(a, b) for a, b in zip(before, biased.biased.parameters()))
        for a, b in zip(replica.state_dict().values(), biased.biased.state_dict().values()):
            assert torch.equal(a, b)
    for a, b in zip(biased.classifier.state_dict().values(), plain.classifier.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="reward_reference 'sampled' compares each mask with a second one"):
        biased.step(grid)


class Quadrant(torch.nn.Module):
    """A classifier that reads only the top-left quarter of the image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, 0, :8, :8].flatten(1))


def test_saliency_mask_hides_what_the_classifier_reads_and_changes_nothing() -> None:
    """With a classifier whose input gradient lives in the top-left quarter, ``saliency-mask`` gives 0 to those 4 of
    16 cells (and to 4 more among the rest, where the gradient is 0: the budget of 0.5 hides half the cells) and 1
    elsewhere; the classifier's weights, buffers, gradients and mode are as they were."""
    core = PretrainCore(tiny_env(mask_budget=0.5))
    core.reset(seed=0)
    core.classifier = Quadrant()
    agent = make_agent("saliency-mask")
    agent.bind(core, 10)
    state = {k: v.clone() for k, v in core.classifier.state_dict().items()}
    grid = agent.act(core.images).grid
    assert grid.shape == (8, 4, 4) and torch.equal(grid.mean((1, 2)), torch.full((8,), 0.5))
    assert (grid[:, :2, :2] == 0).all()
    assert all(torch.equal(v, state[k]) for k, v in core.classifier.state_dict().items())
    assert all(p.grad is None for p in core.classifier.parameters()) and core.classifier.training
    assert torch.equal(agent.mask_policy(core.images), grid)
    assert environment_for("saliency-mask", EnvConfig()).mask_budget == 0.5
    with pytest.raises(ValueError, match="saliency-mask needs a budget"):
        SaliencyMask().bind(PretrainCore(tiny_env()), 10)


@pytest.mark.parametrize(("settings", "message"), [
    ({"bias_q": 0.0}, r"bias_q 0.0 must lie in \(0, 1\]"),
    ({"bias_weight": -1.0}, "bias_weight -1.0 must be a finite number, 0 or more"),
    ({"reward": "shortcut"}, "unknown reward 'shortcut'; use one of classifiable, adversarial, correct, biased"),
])
def test_bad_reward_settings_are_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(EnvConfig(), **settings).validate()


# --- the known answer, with a live classifier ------------------------------------------------------------------------

LIVE_MARKER = "synthrad?n_train=1200&n_val=64&n_test=24&shortcut=marker"
"""The marker spells the class 9 times in 10; the probe is the 64 validation images."""


def lff_run(run_dir: Path, seed: int, agent: dict, steps: int = 120) -> tuple[PretrainRunner, float]:
    """``reinforce-lff`` with its registered defaults (but ``agent``) on the marker task at 32 px (grid 8, blur 5 / 2,
    batch 32), the classifier and the biased classifier training as usual; the runner and its wall time."""
    env = EnvConfig(dataset=LIVE_MARKER, image_size=32, grid=8, blur_kernel=5, blur_sigma=2.0, batch_size=32,
                    device="cpu", precision="fp32", seed=seed)
    cfg = PretrainConfig(algo="reinforce-lff", env=env, agent=agent, epochs=100, max_steps=steps, log_every=steps,
                         image_every=10**6, ckpt_every=10**6, run_dir=str(run_dir))
    start = time.perf_counter()
    runner = PretrainRunner(cfg)
    runner.run()
    return runner, time.perf_counter() - start


@pytest.mark.parametrize("learning", ["on", "off"])
def test_the_shortcut_aimed_reward_learns_to_hide_the_marker(tmp_path: Path, learning: str) -> None:
    """With the classifier and the biased classifier training as usual, 120 steps of ``reinforce-lff`` teach the policy
    to put less mask on each image's marker than elsewhere, in at least two of the seeds 0, 1 and 2: the expected mask
    on the marker's pixels ends more than 0.1 below its mean on the other pixels (``marker_gap`` < -0.1), most of it
    image-specific (the markers sit at different corners: ``marker_gap_image_specific`` < -0.1), and the Beta moves
    away from where it started (``kl_initial`` > 0.5). With the policy's update switched off (policy lr 1e-12) nothing
    moves: the margins fail.

    Not asserted, and printed: the content. The biased classifier reads the anatomy as well as the marker this early,
    so the policy hides the content too (docs/method.md, section 8).
    """
    learned = []
    for seed in (0, 1, 2) if learning == "on" else (0,):
        runner, seconds = lff_run(tmp_path / f"run{seed}", seed, {} if learning == "on" else {"policy_lr": 1e-12})
        d = {k.split("/")[1]: float(v) for k, v in runner.diagnostics().items()}
        print(f"learning {learning}, seed {seed}: {seconds:.1f} s; kl_initial {d['kl_initial']:.4f}, marker_gap "
              f"{d['marker_gap']:+.4f} (image-specific {d['marker_gap_image_specific']:+.4f}), content_gap "
              f"{d['content_gap']:+.4f}; mask on marker {d['mask_on_marker']:.3f} / anatomy {d['mask_on_anatomy']:.3f}"
              f" / lesion {d['mask_on_lesion']:.3f} / background {d['mask_on_background']:.3f}")
        learned.append(d["marker_gap"] < -0.1 and d["marker_gap_image_specific"] < -0.1 and d["kl_initial"] > 0.5)
        if learning == "off":
            assert d["kl_initial"] < 1e-6 and abs(d["marker_gap"]) < 0.01, d
    assert sum(learned) >= 2 if learning == "on" else not any(learned), learned
