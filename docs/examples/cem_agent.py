"""A cross-entropy-method mask policy: a complete agent, registered as ``cem-mask`` (docs/agents.md)."""

from __future__ import annotations

import torch
from torch.distributions import Beta

from agents.base import Action, Agent
from agents.registry import register
from envs.core import PretrainCore, StepResult


class CrossEntropyMask(Agent):
    """One Beta mean per grid cell, shared by every image. After each step the means move toward the mean grid of the
    images that earned the highest rewards (the elite), as the cross-entropy method moves its sampling distribution."""

    name = "cem-mask"
    learns = True

    def __init__(self, elite: float = 0.25, rate: float = 0.1, concentration: float = 4.0) -> None:
        if not 0 < elite <= 1 or not 0 < rate <= 1 or concentration <= 0:
            raise ValueError(f"cem-mask needs 0 < elite <= 1, 0 < rate <= 1 and concentration > 0; got elite {elite}, "
                             f"rate {rate}, concentration {concentration}")
        self.elite, self.rate, self.concentration = elite, rate, concentration

    def bind(self, core: PretrainCore, total_steps: int) -> None:
        super().bind(core, total_steps)
        self.mean = torch.full((core.cfg.grid, core.cfg.grid), 0.5, device=core.dev.device)

    def mask_distribution(self, images: torch.Tensor) -> Beta:
        mean = self.mean.expand(images.shape[0], -1, -1)
        return Beta(self.concentration * mean, self.concentration * (1 - mean))

    def act(self, images: torch.Tensor) -> Action:
        self.grid = self.mask_distribution(images).sample()  # the global generator: in the run's checkpoints
        return Action(grid=self.grid)

    def observe(self, result: StepResult) -> dict[str, float]:
        k = max(1, round(self.elite * result.reward.numel()))
        best = result.reward.topk(k).indices
        self.mean = ((1 - self.rate) * self.mean + self.rate * self.grid[best].mean(0)).clamp(0.02, 0.98)
        return {"policy/elite_reward": result.reward[best].mean(), "policy/cell_spread": self.mean.std()}

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"].to(self.core.dev.device)


def register_agents() -> None:
    """The entry point: ``[project.entry-points."noisemask.agents"] cem-mask = "cem_agent:register_agents"``."""
    register("cem-mask", CrossEntropyMask, ("elite", "rate", "concentration"),
             "cross-entropy method: per-cell Beta means moved toward the best-rewarded images' grids")
