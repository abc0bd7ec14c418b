"""What every agent shares: the interface the pretraining runner drives, and the default loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributions import Beta

from agents.policy import sample_mask
from envs.core import PretrainCore, StepResult

if TYPE_CHECKING:
    from agents.runner import PretrainRunner


@dataclass
class Action:
    """How the environment should perturb the current batch (a mask grid, a function, or neither), and how
    it should weigh the classifier's loss."""

    grid: torch.Tensor | None = None
    """Noise-mask grid (B, G, G) with values in [0, 1]."""
    perturb: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Applied to the normalised (and masked) batch."""
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Applied to the uint8 batch (B, C, H, W) before it is normalised (image augmentations)."""
    loss_scale: torch.Tensor | None = None
    """A 0-d tensor on the device that multiplies the classifier's batch-mean cross-entropy (None: 1)."""
    on_reward: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    """Called by the environment with the step's per-image reward and cross-entropy as soon as they are known, before
    the classifier's backward pass (``envs.core.PretrainCore.step``): an agent may start its update there."""
    on_next_batch: Callable[[torch.Tensor], None] | None = None
    """Called by the environment with the next uint8 batch right after ``on_reward``, still before the classifier's
    backward pass (not at an epoch's end): an agent may start its next action's work there."""
    reference_grid: torch.Tensor | None = None
    """A second grid per image (B, G, G) drawn from the same policy independently of ``grid``: the reward's reference
    under ``reward_reference="sampled"`` (``envs.core.EnvConfig``)."""


class Agent:
    """An agent chooses each step's noise mask and, if it learns, updates itself from the rewards.

    Subclasses override :meth:`act` and, when they learn, :meth:`observe`, :meth:`state_dict`
    and :meth:`load_state_dict`. Agents with their own training loop (stable-baselines3's) override
    :meth:`learn`.
    """

    name = "agent"
    learns = False

    def bind(self, core: PretrainCore, total_steps: int) -> None:
        """Build what depends on the environment (networks, optimisers, schedules)."""
        self.core = core
        self.total_steps = total_steps

    def act(self, images: torch.Tensor) -> Action:
        raise NotImplementedError

    def mask_distribution(self, images: torch.Tensor) -> Beta | None:
        """The per-cell Beta distribution (batch shape (B, G, G)) the agent draws a uint8 batch's mask grids from,
        without gradient and without changing any state; None for an agent that draws no mask. The runner reads
        it on a fixed probe batch to log what the policy learned (``agents.diagnostics``)."""
        return None

    def mask_policy(self, images: torch.Tensor) -> Beta | torch.Tensor | None:
        """What the diagnostics read (``agents.diagnostics``): :meth:`mask_distribution` where there is one. An agent
        whose grids are not drawn from a Beta (``saliency-mask``'s come from the classifier) overrides it to return
        its expected grid (B, G, G), without gradient and without changing any state, so its masks get the same
        diagnostics; None for an agent that draws no mask."""
        return self.mask_distribution(images)

    def evaluation_action(self, images: torch.Tensor) -> Action:
        """The perturbation the agent applies in training, for evaluating a model on inputs like its training
        inputs, without learning or side effects: a grid sampled from :meth:`mask_distribution` where there is
        one, else :meth:`act` (the non-learned agents' ``act`` has no side effects)."""
        dist = self.mask_distribution(images)
        return Action(grid=sample_mask(dist)) if dist is not None else self.act(images)

    def observe(self, result: StepResult) -> dict[str, float]:
        """Learn from one step's result; return scalars to log (``name -> value``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def checkpoint_ready(self) -> bool:
        """Whether :meth:`state_dict` now holds everything needed to continue exactly.

        Agents that learn from multi-step rollouts (stable-baselines3's) say False mid-rollout: the runner
        then defers a checkpoint that falls due there, and the agent calls
        ``runner.save_pending_checkpoint()`` at its next rollout boundary.
        """
        return True

    def save_extra(self, run_dir) -> None:
        """Write agent-specific files into the run folder at the end (none by default)."""

    def learn(self, runner: PretrainRunner) -> None:
        """Drive the environment until the runner says stop: act, step, observe, report."""
        core = self.core
        while not runner.done():
            if core.exhausted:
                core.reset()
            action = self.act(core.images)
            result = core.step(grid=action.grid, perturb=action.perturb, loss_scale=action.loss_scale,
                               augment=action.augment, on_reward=action.on_reward,
                               on_next_batch=action.on_next_batch, reference_grid=action.reference_grid)
            scalars = self.observe(result)
            runner.after_step(result, scalars)
