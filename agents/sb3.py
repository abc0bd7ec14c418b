"""stable-baselines3 PPO and A2C driving the same environment, as baselines for our REINFORCE.

stable-baselines3 has no Beta distribution, so this module provides one (:class:`BetaDistribution`)
and an actor-critic policy that uses it (:class:`BetaActorCriticPolicy`): every cell of a mask grid is
an independent Beta, so actions land in [0, 1] without clipping. Its features extractor
(:class:`MaskFeaturesExtractor`) is the same light convolutional trunk as our REINFORCE policy's
(:class:`agents.policy.BetaMaskPolicy`), pooled to the G x G grid, and a 1x1 convolution gives each
cell's two concentrations, so the three agents differ in the estimator, not in the network.

The agents drive :class:`envs.vec_env.NoiseMaskVecEnv` (one slot per image) wrapped in ``VecMonitor``.
Every VecEnv step is one classifier step, and an action is G * G independent cells, so the defaults differ
from stable-baselines3's:

- ``n_steps = 8``: a rollout of 8 classifier steps (``8 * batch`` samples) per policy update;
- ``gamma = 0``: a mask is credited with its own image's reward, as in our REINFORCE and the paper.
  A slot's next image is an unrelated image of the next batch, so discounted future rewards would
  only add noise; the critic then learns a per-image baseline, the expected reward of that image.
- PPO keeps stable-baselines3's Adam (lr 3e-4) and 10 epochs per rollout, in minibatches of a quarter of
  the rollout (64 samples at batch 32 and ``n_steps = 8``), but bounds its update per cell: it does not clip
  the probability ratio (``clip_range=None``) and stops an update's epochs once the approximate KL divergence
  from the rollout's policy passes ``1.5 * 0.002 * G * G`` (``target_kl_per_cell``, stable-baselines3's
  ``target_kl`` scaled to the grid). The ratio PPO clips is a whole mask's: the product of G * G cells'
  ratios, whose logarithm sums G * G per-cell log-ratios with zero-mean noise, so it grows about G times as
  fast as one cell's. Clipped at 1 +- 0.2, PPO spent its updates on that noise and did not move: on small
  synthrad (32 px, 304 steps, seeds 0-2) its mean mask value stayed at 0.48-0.52 at grids 8 and 16, with
  the concentrations within 0.08 of 1, approx_kl 0.02-0.03 and a clip fraction of 0.21-0.28 per update, under
  the default reward and under the adversarial one alike, while REINFORCE followed each reward (grid 8: 0.55
  and 0.21, against 0.49 for its parameterisation's drift alone). A larger learning rate only clipped more
  (one seed: clip fraction 0.55 at 1e-3, 0.80 at 3e-3, mean mask 0.51 and 0.54). Without the clip PPO follows
  the rewards as REINFORCE does (0.59 and 0.21), and the KL stop keeps an update to about 0.003 nats per cell.
- A2C keeps stable-baselines3's RMSprop with a learning rate of 3e-3 instead of 7e-4: it updates once per
  rollout and RMSprop moves each weight by about the learning rate per update, so at 7e-4 its 38 updates in
  304 steps left the mean mask within 0.04 of 0.5 under either reward (at 3e-3: 0.64 and 0.15 at grid 8).
- The critic of both is the mean over cells of a per-cell value (:class:`SpatialValueHead`), not a linear
  layer over all cells' features: it predicts one image's reward under a classifier that changes every
  step, and the linear layer's 2,049 (grid 8) to 8,193 (grid 16) weights fitted noise (PPO's explained
  variance -0.11 to -0.20), against 33 weights and -0.03 to -0.04. A2C does not normalise its advantages, so
  its critic's noise enters its gradient directly (RMSprop at 1e-2 and grid 8: mean mask 0.61 with the linear
  critic, 0.74 with the per-cell one).
- The Beta head starts at concentration 1 (uniform masks), its weights orthogonal with stable-baselines3's
  gain 0.01 for action heads: it was not what held PPO back (without the clip it moved at once).

benchmarks/RESULTS.md ("REINFORCE, PPO and A2C: do they learn the same thing?") has the measurements (at grid 16
and 304 steps all three agents, REINFORCE included, still scatter widely by seed); a test checks, on a task whose
best mask is known, that PPO and A2C learn it (``test_sb3_learns_to_keep_the_informative_half``).

Files. stable-baselines3's own TensorBoard scalars (``train/value_loss``, ``rollout/ep_rew_mean``, ...)
go to ``run_dir/sb3`` against classifier steps, the x axis of our logs; its last update's statistics
and the Beta parameters also reach ``metrics.jsonl`` under ``policy/...``; at the end the model is
saved as ``run_dir/sb3/model.zip`` (``PPO.load`` / ``A2C.load``; stable-baselines3's format unpickles
classes, so load only trusted files; resuming never reads it).

Exact resume. Between rollouts (after an update, before the next step) the agent's whole state is
small: the policy, its optimiser, counters and the episode bookkeeping; mid-rollout it would also need
the rollout buffer and stable-baselines3's position inside ``collect_rollouts``, which has no way to
restart there. So :meth:`SB3Agent.checkpoint_ready` is False mid-rollout, the runner defers a
checkpoint that falls due there, and the agent writes it at the next rollout boundary
(``PretrainRunner.save_pending_checkpoint``). A run that ends mid-rollout (its last epoch or
``--max-steps`` is not a whole number of rollouts) also writes one at its last boundary; ``--resume``
replays the steps after it, which gives the same classifier, policy and logs as an uninterrupted run.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import get_action_dim, preprocess_obs
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.common.vec_env import VecMonitor
from torch import nn
from torch.distributions import Beta
from torch.utils.tensorboard import SummaryWriter

from agents.base import Agent
from agents.policy import CONC_MAX, CONC_MIN, GridFeatures, cell_beta, mask_log_prob, sample_mask
from agents.registry import BUDGETED_ENV, register
from classifiers.io import atomic_write
from classifiers.train import NonFiniteError
from envs.core import PretrainCore, StepResult
from envs.vec_env import NoiseMaskVecEnv

if TYPE_CHECKING:
    from agents.runner import PretrainRunner

_RAW_AT_ONE = math.log(math.expm1(1.0 - CONC_MIN))
"""The raw output that gives a concentration of 1, so a freshly initialised head (output ~0) samples
uniform Beta(1, 1) masks."""


def beta_concentration(raw: torch.Tensor) -> torch.Tensor:
    """``CONC_MIN + softplus(raw + c)``, at most ``CONC_MAX``: positive, finite, and 1 at ``raw = 0``."""
    return (CONC_MIN + F.softplus(raw.float() + _RAW_AT_ONE)).clamp(max=CONC_MAX)


class BetaDistribution(Distribution):
    """Independent Beta distributions, one per action dimension, for ``Box(0, 1)`` actions.

    The parameters are ``2 * action_dim`` raw outputs per sample: the first half gives each dimension's
    ``alpha``, the second half its ``beta`` (see :func:`beta_concentration`). Samples are kept inside
    ``[SAMPLE_EPS, 1 - SAMPLE_EPS]`` so their log-probabilities stay finite; log-probabilities and
    entropies are summed over the action dimensions.

    Args:
        action_dim: number of independent Beta-distributed action dimensions (G * G for a mask grid).
    """

    distribution: Beta

    def __init__(self, action_dim: int) -> None:
        super().__init__()
        self.action_dim = action_dim

    def proba_distribution_net(self, latent_dim: int) -> nn.Module:
        """A linear layer from the latent vector to the ``2 * action_dim`` raw concentrations."""
        return nn.Linear(latent_dim, 2 * self.action_dim)

    def proba_distribution(self, params: torch.Tensor) -> BetaDistribution:
        """Set the distribution from raw parameters of shape ``(N, 2 * action_dim)``."""
        finite = torch.isfinite(params)
        if not bool(finite.all()):
            bad = params[~finite]
            raise NonFiniteError(f"{bad.numel()} of the policy's {params.numel()} Beta parameters are not finite "
                                 f"(for example {bad[:4].tolist()}); nothing was updated with them. Lower "
                                 "--policy-lr or check the inputs")
        raw_alpha, raw_beta = params.chunk(2, dim=-1)
        self.distribution = cell_beta(beta_concentration(raw_alpha), beta_concentration(raw_beta))
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """Joint log-probability of ``actions`` (N, action_dim), shape (N,)."""
        return mask_log_prob(self.distribution, actions).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Joint entropy, shape (N,)."""
        return self.distribution.entropy().sum(-1)

    def sample(self) -> torch.Tensor:
        return sample_mask(self.distribution)

    def mode(self) -> torch.Tensor:
        """The mean ``alpha / (alpha + beta)``: a Beta's mode is undefined or at 0 or 1 when a concentration
        is below 1, while its mean is always a usable mask value."""
        return self.distribution.mean

    def actions_from_params(self, params: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        self.proba_distribution(params)
        return self.get_actions(deterministic=deterministic)

    def log_prob_from_params(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actions = self.actions_from_params(params)
        return actions, self.log_prob(actions)


class MaskFeaturesExtractor(BaseFeaturesExtractor):
    """Features of each grid cell from a uint8 image: the trunk of our REINFORCE policy, pooled to G x G.

    The image (values 0..255, as stable-baselines3 hands it over with ``normalize_images=False``) is
    normalised with the paper's mean and standard deviation, resized to at most ``input_size`` px,
    passed through three 3x3 convolutions (two strided) and average-pooled to the grid. Works from
    32 px up. The output is the flattened ``(2 * width, G, G)`` map.

    Args:
        observation_space: ``Box(0, 255, (C, H, W), uint8)``.
        grid: side G of the mask grid.
        width: channels of the first convolution (the others have twice as many).
        input_size: the image is resized to at most this side first.
    """

    def __init__(self, observation_space: gym.spaces.Box, grid: int, width: int = 16, input_size: int = 64) -> None:
        self.grid, self.channels, self.input_size = grid, 2 * width, input_size
        super().__init__(observation_space, features_dim=self.channels * grid * grid)
        self.features = GridFeatures(observation_space.shape[0], grid, width, input_size)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.features(observations).flatten(1)


class SpatialHead(nn.Module):
    """A 1x1 convolution over a flattened ``(channels, G, G)`` feature map: ``outputs`` values per cell."""

    def __init__(self, channels: int, grid: int, outputs: int) -> None:
        super().__init__()
        self.channels, self.grid = channels, grid
        self.conv = nn.Conv2d(channels, outputs, 1)

    def cells(self, latent: torch.Tensor) -> torch.Tensor:
        """``(N, outputs, G, G)``."""
        return self.conv(latent.view(-1, self.channels, self.grid, self.grid))


class SpatialBetaHead(SpatialHead):
    """Per-cell raw concentrations: output ``(N, 2 * G * G)``, all cells' alpha parameters, then all cells' beta
    parameters, the layout :class:`BetaDistribution` expects."""

    def __init__(self, channels: int, grid: int) -> None:
        super().__init__(channels, grid, 2)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.cells(latent).flatten(1)


class SpatialValueHead(SpatialHead):
    """The critic: the mean over cells of a per-cell value, shape ``(N, 1)``.

    It has ``channels + 1`` parameters at any grid, where a linear layer over all cells' features has
    ``channels * G * G + 1`` (8,193 at G = 16) to fit one reward per image (see the module docstring).
    """

    def __init__(self, channels: int, grid: int) -> None:
        super().__init__(channels, grid, 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.cells(latent).mean((2, 3))


class BetaActorCriticPolicy(ActorCriticPolicy):
    """An actor-critic for noise masks: Beta-distributed actions in [0, 1], one Beta per grid cell.

    Defaults (each can be overridden through ``policy_kwargs``): :class:`MaskFeaturesExtractor` with
    ``grid`` taken from the action space, shared by actor and critic; no extra MLP layers
    (``net_arch = {"pi": [], "vf": []}``), so the actor is a 1x1 convolution per cell
    (:class:`SpatialBetaHead`) and the critic the mean of a per-cell value (:class:`SpatialValueHead`);
    ``normalize_images=False`` (the extractor normalises). With another extractor or MLP layers the
    actor and the critic are linear layers (:meth:`BetaDistribution.proba_distribution_net`). gSDE is not
    supported.
    """

    def __init__(self, observation_space: gym.spaces.Box, action_space: gym.spaces.Box, lr_schedule: Schedule,
                 **kwargs: Any) -> None:
        if kwargs.get("use_sde"):
            raise ValueError("use_sde=True: gSDE perturbs Gaussian actions; the Beta mask policy samples its own noise")
        kwargs.setdefault("features_extractor_class", MaskFeaturesExtractor)
        if kwargs["features_extractor_class"] is MaskFeaturesExtractor:
            kwargs["features_extractor_kwargs"] = {"grid": action_space.shape[-1],
                                                   **(kwargs.get("features_extractor_kwargs") or {})}
        kwargs.setdefault("net_arch", {"pi": [], "vf": []})
        kwargs.setdefault("normalize_images", False)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        """Like ``ActorCriticPolicy._build``, with the Beta distribution and its per-cell head."""
        self.action_dist = BetaDistribution(get_action_dim(self.action_space))
        self._build_mlp_extractor()
        extractor, critic_extractor = self.pi_features_extractor, self.vf_features_extractor
        if isinstance(extractor, MaskFeaturesExtractor) and self.mlp_extractor.latent_dim_pi == self.features_dim:
            self.action_net = SpatialBetaHead(extractor.channels, extractor.grid)
        else:
            self.action_net = self.action_dist.proba_distribution_net(self.mlp_extractor.latent_dim_pi)
        if (isinstance(critic_extractor, MaskFeaturesExtractor)
                and self.mlp_extractor.latent_dim_vf == critic_extractor.features_dim):
            self.value_net = SpatialValueHead(critic_extractor.channels, critic_extractor.grid)
        else:
            self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if self.ortho_init:  # stable-baselines3's gains, in its order (initialisation consumes the RNG)
            extractors = [self.features_extractor, self.pi_features_extractor, self.vf_features_extractor]
            gains = dict.fromkeys(extractors, np.sqrt(2))
            gains |= {self.mlp_extractor: np.sqrt(2), self.action_net: 0.01, self.value_net: 1.0}
            for module, gain in gains.items():
                module.apply(partial(self.init_weights, gain=gain))
        self.to(memory_format=torch.channels_last)  # the convolutions, as in our policy (see GridFeatures)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def parameters_to_vector(self) -> np.ndarray:
        """All parameters as one flat vector (``reshape``: the convolutions' weights are channels-last)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()]).cpu().numpy()

    def load_from_vector(self, vector: np.ndarray) -> None:
        """Load :meth:`parameters_to_vector`'s vector in place, keeping every parameter's memory format."""
        flat = torch.as_tensor(vector, dtype=torch.float32, device=self.device)
        if flat.numel() != sum(p.numel() for p in self.parameters()):
            raise ValueError(f"vector of {flat.numel()} values for {sum(p.numel() for p in self.parameters())} "
                             "parameters; pass the output of parameters_to_vector() of the same policy")
        with torch.no_grad():
            start = 0
            for p in self.parameters():
                p.copy_(flat[start:start + p.numel()].view_as(p))
                start += p.numel()

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor) -> BetaDistribution:
        return self.action_dist.proba_distribution(self.action_net(latent_pi))

    def mask_distribution(self, images: torch.Tensor) -> Beta:
        """The per-cell Beta that acting samples from, batch shape ``(B, *action_shape)``, for a uint8 batch.

        Evaluated as stable-baselines3 acts (eval mode, no gradient), then the previous mode is restored. Unlike
        :meth:`get_distribution` it leaves ``action_dist`` alone: that holds the last step's distribution, which
        the agent logs.
        """
        was_training = self.training
        self.set_training_mode(False)
        try:
            with torch.no_grad():
                obs = preprocess_obs(images.to(self.device), self.observation_space, self.normalize_images)
                features = self.pi_features_extractor(obs)
                params = self.action_net(self.mlp_extractor.forward_actor(features))
        finally:
            self.set_training_mode(was_training)
        dist = BetaDistribution(self.action_dist.action_dim).proba_distribution(params).distribution
        shape = (images.shape[0], *self.action_space.shape)
        return cell_beta(dist.concentration1.view(shape), dist.concentration0.view(shape))


@dataclass
class SB3Config:
    """Hyperparameters shared by the stable-baselines3 agents (see the module docstring for the defaults)."""

    n_steps: int = 8
    """Classifier steps per rollout (the rollout holds ``n_steps * batch`` samples)."""
    gamma: float = 0.0
    """Discount factor: 0 credits each mask with its own image's reward."""
    gae_lambda: float = 0.95
    """GAE lambda (irrelevant when ``gamma = 0``)."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    policy_lr: float = 3e-4
    """Learning rate of the policy's optimiser (Adam for PPO, RMSprop for A2C)."""
    max_grad_norm: float = 0.5
    """Clip the policy gradient's global norm to this (0: no clipping)."""
    policy_width: int = 16
    """Channels of the features extractor's first convolution."""
    policy_input_size: int = 64
    """The policy sees the image resized to at most this side."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the value for any setting that cannot work."""
        for name in ("n_steps", "policy_width", "policy_input_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} must lie in [0, 1]")
        if not (self.policy_lr > 0 and math.isfinite(self.policy_lr)):
            raise ValueError(f"policy learning rate {self.policy_lr} must be a positive finite number (default: "
                             f"{type(self).policy_lr})")
        for name in ("ent_coef", "vf_coef", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be 0 or more")


@dataclass
class PPOConfig(SB3Config):
    """PPO hyperparameters."""

    n_epochs: int = 10
    """Passes over each rollout."""
    sb3_batch_size: int | None = None
    """Minibatch size in samples (None: a quarter of the rollout, ``n_steps * batch / 4``, at least 2)."""
    clip_range: float | None = None
    """Clip the probability ratio of a whole mask (the product of its G * G cells' ratios) to
    ``[1 - clip_range, 1 + clip_range]``; None: no clipping, ``target_kl_per_cell`` bounds the update instead."""
    target_kl_per_cell: float = 0.002
    """Stop an update's epochs once the approximate KL divergence from the rollout's policy, summed over the
    cells, exceeds ``1.5 * target_kl_per_cell * G * G`` (stable-baselines3's ``target_kl`` scaled to the grid);
    0: never."""

    def validate(self) -> None:
        super().validate()
        if self.n_epochs < 1:
            raise ValueError(f"n_epochs {self.n_epochs} must be at least 1")
        if self.sb3_batch_size is not None and self.sb3_batch_size < 2:
            raise ValueError(f"sb3_batch_size {self.sb3_batch_size} must be at least 2 (PPO normalises advantages "
                             "over each minibatch)")
        if self.clip_range is not None and not self.clip_range > 0:
            raise ValueError(f"clip_range {self.clip_range} must be positive (or None: no clipping)")
        if not self.target_kl_per_cell >= 0:
            raise ValueError(f"target_kl_per_cell {self.target_kl_per_cell} must be 0 or more")


@dataclass
class A2CConfig(SB3Config):
    """A2C hyperparameters (stable-baselines3's GAE lambda; a larger learning rate, see the module docstring)."""

    gae_lambda: float = 1.0
    """GAE lambda (1: plain n-step advantages; irrelevant when ``gamma = 0``)."""
    policy_lr: float = 3e-3
    """Learning rate of the policy's RMSprop optimiser (stable-baselines3's default: 7e-4)."""


class ClassifierStepTensorBoard(KVWriter):
    """stable-baselines3's scalars to TensorBoard against classifier steps (its ``num_timesteps / num_envs``),
    the x axis of our own logs; on resume, events after ``purge_step`` are dropped."""

    def __init__(self, folder: str | Path, num_envs: int, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        self.num_envs = num_envs

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        for key, value in key_values.items():
            excluded = key_excluded.get(key) or ()
            if "tensorboard" not in excluded and isinstance(value, (int, float, np.integer, np.floating)):
                self.writer.add_scalar(key, value, step // self.num_envs)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_TRAIN_STATS = {
    "train/policy_gradient_loss": "policy/loss", "train/policy_loss": "policy/loss",
    "train/value_loss": "policy/value_loss", "train/entropy_loss": "policy/entropy_loss",
    "train/approx_kl": "policy/approx_kl", "train/clip_fraction": "policy/clip_fraction",
    "train/explained_variance": "policy/explained_variance", "train/learning_rate": "policy/lr",
}
"""stable-baselines3's training statistics, renamed to our ``policy/...`` keys for ``metrics.jsonl``."""


class _RunnerCallback(BaseCallback):
    """Tells the agent where rollouts start, and stops stable-baselines3 when the runner is done.

    A run that ends on a rollout's last step lets that rollout be learned from, so it ends at a rollout
    boundary (where its checkpoint is exact); one that ends earlier stops mid-rollout.
    """

    def __init__(self, agent: SB3Agent, runner: PretrainRunner) -> None:
        super().__init__()
        self.agent, self.runner = agent, runner
        self.rollout_steps = 0
        self.stopped_mid_rollout = False

    def _on_rollout_start(self) -> None:
        self.rollout_steps = 0
        self.agent.rollout_boundary()

    def _on_step(self) -> bool:
        self.rollout_steps += 1
        if self.runner.done() and self.rollout_steps < self.agent.cfg.n_steps:
            self.stopped_mid_rollout = True
            return False
        return True


class SB3Agent(Agent):
    """A stable-baselines3 on-policy algorithm with :class:`BetaActorCriticPolicy` driving the VecEnv face.

    Subclasses name the algorithm and say how its options map to it (:meth:`algorithm_kwargs`).
    """

    learns = True
    algorithm: ClassVar[type[OnPolicyAlgorithm]]
    config_class: ClassVar[type[SB3Config]]

    def __init__(self, **kwargs: Any) -> None:
        self.cfg = self.config_class(**kwargs)
        self.cfg.validate()

    def algorithm_kwargs(self, num_envs: int, grid: int) -> dict[str, Any]:
        """Keyword arguments of the stable-baselines3 algorithm beyond the policy and the environment, for
        ``num_envs`` slots choosing ``grid`` x ``grid`` masks."""
        c = self.cfg
        return {"learning_rate": c.policy_lr, "n_steps": c.n_steps, "gamma": c.gamma, "gae_lambda": c.gae_lambda,
                "ent_coef": c.ent_coef, "vf_coef": c.vf_coef, "max_grad_norm": c.max_grad_norm or math.inf}

    def bind(self, core: PretrainCore, total_steps: int) -> None:
        if core.distributed:
            raise ValueError(f"--algo {self.name} runs in one process (stable-baselines3 does not distribute its "
                             "updates); run it without torchrun, or use --algo reinforce under torchrun")
        super().bind(core, total_steps)
        self.venv = NoiseMaskVecEnv(core)
        self.venv.on_step = self._on_env_step
        self.env = VecMonitor(self.venv)
        grid = core.cfg.grid
        policy_kwargs = {"features_extractor_kwargs": {"grid": grid, "width": self.cfg.policy_width,
                                                       "input_size": self.cfg.policy_input_size}}
        self.model: OnPolicyAlgorithm = self.algorithm(
            BetaActorCriticPolicy, self.env, policy_kwargs=policy_kwargs, device=core.dev.device, verbose=0,
            **self.algorithm_kwargs(self.venv.num_envs, grid))
        self.untrained_steps = 0
        self.train_stats: dict[str, float] = {}
        """The last update's statistics (stable-baselines3's ``train/...`` keys, non-finite ones too, such as the
        clip range when PPO does not clip: a resumed run records them all again), logged with every step."""
        self.runner: PretrainRunner | None = None

    def checkpoint_ready(self) -> bool:
        """True between rollouts: every step taken so far has been learned from (see the module docstring)."""
        return self.untrained_steps == 0

    def rollout_boundary(self) -> None:
        """A rollout starts: the previous one has been learned from, so a pending checkpoint is exact now.

        When the run will end before the next boundary, a checkpoint is written here even if none is due,
        so a run that stops mid-rollout leaves one from which ``--resume`` is exact.
        """
        if self.untrained_steps:
            self._check_updated_policy()
        self.untrained_steps = 0
        logger = self.model.logger
        stats = {k: float(v) for k, v in logger.name_to_value.items() if k.startswith("train/")
                 and "tensorboard" not in (logger.name_to_excluded.get(k) or ())}
        if stats:
            self.train_stats = stats
        last = self.total_steps - self.core.global_step < self.cfg.n_steps
        self.runner.save_pending_checkpoint(force=last)

    def _check_updated_policy(self) -> None:
        """After an update, refuse non-finite policy weights before a checkpoint can hold them (one device sync):
        a diverging PPO ratio can overflow and leave NaN weights behind finite Beta parameters."""
        policy = self.model.policy
        if not bool(torch.stack([torch.isfinite(p).all() for p in policy.parameters()]).all()):
            bad = [name for name, p in policy.named_parameters() if not bool(torch.isfinite(p).all())]
            raise NonFiniteError(f"the policy's weights are not finite after its update ({', '.join(bad[:3])}); "
                                 "nothing was saved from it. Lower --policy-lr or check the inputs")

    def _on_env_step(self, result: StepResult, grid: torch.Tensor) -> None:
        """Called by the VecEnv after every classifier step, before any automatic reset."""
        self.untrained_steps += 1
        dist = self.model.policy.action_dist.distribution
        alpha, beta = dist.concentration1.detach(), dist.concentration0.detach()
        scalars = {"policy/entropy_per_cell": dist.entropy().detach().mean(),
                   "policy/alpha_mean": alpha.mean(), "policy/alpha_std": alpha.std(),
                   "policy/beta_mean": beta.mean(), "policy/beta_std": beta.std(),
                   **{_TRAIN_STATS[k]: v for k, v in self.train_stats.items()
                      if k in _TRAIN_STATS and math.isfinite(v)}}  # metrics.jsonl holds finite numbers only
        self.runner.after_step(result, scalars)

    def mask_distribution(self, images: torch.Tensor) -> Beta:
        """The policy's per-cell Beta for a uint8 batch ``(B, C, H, W)``: batch shape ``(B, G, G)``,
        ``concentration1`` alpha and ``concentration0`` beta, the distribution a step samples masks from.

        No gradient, no random draws, no change to the policy, its mode or the last step's logged distribution."""
        return self.model.policy.mask_distribution(images)

    def _sb3_logger(self, run_dir: Path | None) -> Logger:
        """stable-baselines3's TensorBoard output in ``run_dir/sb3`` (none without a run folder)."""
        if run_dir is None:
            return Logger(folder=None, output_formats=[])
        folder = Path(run_dir) / "sb3"
        step = self.core.global_step
        if step == 0:
            for stale in folder.glob("events.out.tfevents.*"):
                stale.unlink()  # the logs of a run that died before its first checkpoint
        tensorboard = ClassifierStepTensorBoard(folder, self.venv.num_envs, purge_step=step + 1 if step else None)
        return Logger(folder=str(folder), output_formats=[tensorboard])

    def learn(self, runner: PretrainRunner) -> None:
        """Run stable-baselines3's ``learn`` for the runner's remaining steps, reporting every step to it."""
        model, num_envs = self.model, self.venv.num_envs
        self.runner = runner
        logger = self._sb3_logger(runner.run_dir)
        for key, value in self.train_stats.items():  # on resume: the last update's, due in the next dump
            logger.record(key, value)
        model.set_logger(logger)
        model._last_obs = self.venv.current_obs()
        if model._last_episode_starts is None:
            model._last_episode_starts = np.ones(num_envs, dtype=bool)
        callback = _RunnerCallback(self, runner)
        remaining = self.total_steps - self.core.global_step
        try:
            model.learn(remaining * num_envs, callback=callback, log_interval=1, reset_num_timesteps=False)
            if self.untrained_steps and not callback.stopped_mid_rollout:
                self._check_updated_policy()  # the last update, before the final checkpoint
        except NonFiniteError as exc:
            where = "updating from the rollout that ended" if self.untrained_steps >= self.cfg.n_steps else "acting"
            raise NonFiniteError(f"{exc} (while {where} at step {self.core.global_step})") from None
        finally:
            logger.close()
        if not callback.stopped_mid_rollout:
            self.untrained_steps = 0  # the last rollout was learned from
            runner.save_pending_checkpoint()

    def state_dict(self) -> dict[str, Any]:
        if not self.checkpoint_ready():
            raise RuntimeError(f"{self.name} is {self.untrained_steps} steps into a rollout; its state can be saved "
                               "exactly only between rollouts (checkpoint_ready() is False)")
        model, monitor = self.model, self.env
        episodes = [[float(e["r"]), float(e["l"]), float(e["t"])] for e in (model.ep_info_buffer or [])]
        starts = model._last_episode_starts
        return {
            "policy": model.policy.state_dict(),
            "optimizer": model.policy.optimizer.state_dict(),
            "num_timesteps": model.num_timesteps,
            "n_updates": model._n_updates,
            "episode_starts": torch.from_numpy(np.ones(self.venv.num_envs, bool) if starts is None else starts),
            "episode_returns": torch.from_numpy(monitor.episode_returns.copy()),
            "episode_lengths": torch.from_numpy(monitor.episode_lengths.copy()),
            "episode_count": monitor.episode_count,
            "episodes": torch.tensor(episodes, dtype=torch.float64).reshape(-1, 3),
            "train_stats": dict(self.train_stats),
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        model, monitor = self.model, self.env
        model.policy.load_state_dict(state["policy"])
        model.policy.optimizer.load_state_dict(state["optimizer"])
        model.num_timesteps = int(state["num_timesteps"])
        model._n_updates = int(state["n_updates"])
        model._last_episode_starts = state["episode_starts"].numpy().astype(bool)
        monitor.episode_returns = state["episode_returns"].numpy().astype(np.float32)
        monitor.episode_lengths = state["episode_lengths"].numpy().astype(np.int32)
        monitor.episode_count = int(state["episode_count"])
        model.ep_info_buffer = deque(({"r": r, "l": int(n), "t": t} for r, n, t in state["episodes"].tolist()),
                                     maxlen=model._stats_window_size)
        model.ep_success_buffer = deque(maxlen=model._stats_window_size)
        self.train_stats = dict(state["train_stats"])
        self.untrained_steps = 0

    def save_extra(self, run_dir: str | Path) -> None:
        """Write the stable-baselines3 model to ``run_dir/sb3/model.zip`` (``PPO.load`` / ``A2C.load`` read it)."""
        atomic_write(Path(run_dir) / "sb3" / "model.zip", self.model.save)


class PPOAgent(SB3Agent):
    """stable-baselines3 PPO with the Beta mask policy."""

    name = "ppo"
    algorithm = PPO
    config_class = PPOConfig

    def algorithm_kwargs(self, num_envs: int, grid: int) -> dict[str, Any]:
        c = self.cfg
        rollout = c.n_steps * num_envs
        batch = c.sb3_batch_size if c.sb3_batch_size is not None else max(2, rollout // 4)
        target_kl = c.target_kl_per_cell * grid * grid or None
        return {**super().algorithm_kwargs(num_envs, grid), "n_epochs": c.n_epochs, "batch_size": batch,
                "clip_range": math.inf if c.clip_range is None else c.clip_range, "target_kl": target_kl}


class A2CAgent(SB3Agent):
    """stable-baselines3 A2C with the Beta mask policy (RMSprop, one update per rollout)."""

    name = "a2c"
    algorithm = A2C
    config_class = A2CConfig


def _option_names(config_class: type[SB3Config]) -> tuple[str, ...]:
    return tuple(config_class.__dataclass_fields__)


register("ppo", PPOAgent, _option_names(PPOConfig), "stable-baselines3 PPO with a Beta mask policy")
register("a2c", A2CAgent, _option_names(A2CConfig), "stable-baselines3 A2C with a Beta mask policy")
register("ppo-budget", PPOAgent, _option_names(PPOConfig),
         "stable-baselines3 PPO on reinforce-budget's environment: each mask held at the budget (mean 0.5) by the "
         "environment, rewarded by what it hides from the classifier", env=BUDGETED_ENV)
register("a2c-budget", A2CAgent, _option_names(A2CConfig),
         "stable-baselines3 A2C on reinforce-budget's environment (see ppo-budget)", env=BUDGETED_ENV)
