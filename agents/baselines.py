"""Non-learned agents: plain training, a fixed Beta(1, 1) blurred mask, additive Gaussian noise."""

from __future__ import annotations

import torch

from agents.base import Action, Agent


class NoMask(Agent):
    """Plain training: the classifier sees the clean normalised batch (an all-ones mask, not applied)."""

    name = "none"

    def act(self, images: torch.Tensor) -> Action:
        return Action()


class UniformMask(Agent):
    """Cells i.i.d. Beta(a, b) (default Beta(1, 1), uniform), upsampled and blurred like the learned mask.

    This is what the reference code's objective drifts toward, so it is the ablation that tells
    whether a learned policy adds anything.
    """

    name = "uniform-mask"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"Beta({alpha}, {beta}): both concentrations must be positive")
        self.alpha, self.beta = alpha, beta

    def act(self, images: torch.Tensor) -> Action:
        g = self.core.cfg.grid
        dist = torch.distributions.Beta(torch.tensor(self.alpha, device=images.device),
                                        torch.tensor(self.beta, device=images.device))
        return Action(grid=dist.sample((images.shape[0], g, g)))


class GaussianNoise(Agent):
    """Additive Gaussian noise of standard deviation ``noise_std`` on the normalised image."""

    name = "gaussian-noise"

    def __init__(self, noise_std: float = 0.5) -> None:
        if noise_std < 0:
            raise ValueError(f"noise std {noise_std} must be 0 or more")
        self.std = noise_std

    def act(self, images: torch.Tensor) -> Action:
        return Action(perturb=lambda x: x + self.std * torch.randn_like(x))
