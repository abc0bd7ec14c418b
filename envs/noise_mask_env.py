"""``NoiseMask-v0``: the Gymnasium face of the pretraining environment."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from classifiers.data import DataSpec
from envs.core import EnvConfig, PretrainCore


def validate_action(action: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Return ``action`` as float32 of ``shape`` with values in [0, 1], or raise ``ValueError`` saying what is wrong."""
    arr = np.asarray(action)
    if arr.shape != shape:
        raise ValueError(f"action has shape {arr.shape}; a noise-mask action has shape {shape} "
                         "(one G x G grid per image)")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"action has dtype {arr.dtype}; give float32 mask values in [0, 1]")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"action holds {int((~np.isfinite(arr)).sum())} NaN or infinite values; "
                         "mask values must be finite, in [0, 1]")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"action values span [{lo:.4g}, {hi:.4g}]; mask values must lie in [0, 1]")
    return arr


class NoiseMaskEnv(gym.Env):
    """Pretrain a classifier while an agent chooses a multiplicative noise mask for every image.

    ## Description
    Each step the agent sees the current training batch and answers with one noise-mask grid per
    image. The environment upsamples each grid (nearest), blurs it (Gaussian), multiplies it with
    the normalised image and takes one SGD step of the classifier on the masked batch
    (Yavuz and Yang, "Policy Gradient-Driven Noise Mask", ICPR 2025).

    ## Action space
    ``Box(0, 1, (B, G, G), float32)``: a grid of mask values per image of the batch. Actions of the
    wrong shape, with NaN, or outside [0, 1] raise ``ValueError``.

    ## Observation space
    ``Box(0, 255, (B, C, H, W), uint8)``: the current training batch, not normalised.

    ## Rewards
    Computed per image from the cross-entropy of the step's forward pass (before the update):
    ``classifiable`` (default, the paper's sign) gives -CE, rewarding masks that keep the image
    classifiable; ``adversarial`` gives +CE; ``correct`` gives 1 for a correct prediction. The scalar
    reward is the batch mean; ``info["per_image_reward"]`` holds the B values.

    ## Episode end
    Never terminates. Truncates at the end of one pass over the training set, or after
    ``max_steps`` steps when that is set.

    ## Arguments
    Every field of :class:`envs.core.EnvConfig`: ``dataset``, ``classifier``, ``batch_size``,
    ``image_size``, ``grid``, ``blur_kernel``, ``blur_sigma``, ``lr``, ``momentum``, ``weight_decay``,
    ``lr_step_epochs``, ``reward``, ``max_steps``, ``seed``, ``device``, ``workers``; and ``data``,
    an already loaded :class:`classifiers.data.DataSpec` to share between environments.
    ``reset(seed=s)`` re-initialises the classifier, its optimiser and the data order from ``s``;
    ``reset()`` starts the next epoch with the classifier as it is.

    ## Info
    ``per_image_reward`` (B,), ``loss`` and ``accuracy`` of the classifier on the masked batch,
    ``epoch``, ``step`` (classifier steps so far).

    ## Version history
    * v0: initial version.
    """

    metadata = {"render_modes": []}

    def __init__(self, data: DataSpec | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.core = PretrainCore(EnvConfig(**kwargs), data=data)
        cfg = self.core.cfg
        b, c, s, g = cfg.batch_size, self.core.in_channels, cfg.image_size, cfg.grid
        self.observation_space = spaces.Box(0, 255, (b, c, s, s), np.uint8)
        self.action_space = spaces.Box(0.0, 1.0, (b, g, g), np.float32)

    def _obs(self) -> np.ndarray:
        return self.core.images.cpu().numpy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.core.reset(seed=seed)
        return self._obs(), {"epoch": self.core.epoch, "step": self.core.global_step}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        grid = validate_action(action, self.action_space.shape)
        result = self.core.step(torch.from_numpy(grid).to(self.core.dev.device, non_blocking=True))
        info = {
            "per_image_reward": result.reward.cpu().numpy(),
            "loss": float(result.loss.mean()),
            "accuracy": float(result.correct.mean()),
            "epoch": self.core.epoch,
            "step": self.core.global_step,
        }
        return self._obs(), float(result.reward.mean()), False, result.truncated, info
