"""The stable-baselines3 face of the pretraining environment: one VecEnv slot per image of the batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from classifiers.data import DataSpec
from envs.core import EnvConfig, PretrainCore, StepResult
from envs.noise_mask_env import validate_action

StepHook = Callable[[StepResult, torch.Tensor], None]


class NoiseMaskVecEnv(VecEnv):
    """Pretrain a classifier while ``num_envs = batch_size`` slots each choose one image's noise mask.

    ## Description
    The same environment as ``NoiseMask-v0`` (one :class:`~envs.core.PretrainCore`), seen by
    stable-baselines3 as a vectorised environment: slot i observes image i of the current batch and
    answers with that image's mask grid. One :meth:`step_wait` is one classifier step on the whole
    batch, so every slot's next observation is an image of the next batch.

    ## Action space (per slot)
    ``Box(0, 1, (G, G), float32)``; :meth:`step` takes ``(num_envs, G, G)``. Actions of the wrong
    shape, with NaN, or outside [0, 1] raise ``ValueError`` before the classifier changes.

    ## Observation space (per slot)
    ``Box(0, 255, (C, H, W), uint8)``: one training image, not normalised; :meth:`reset` and
    :meth:`step` return ``(num_envs, C, H, W)``.

    ## Rewards
    Slot i's reward is image i's reward (see ``NoiseMask-v0``: -CE by default).

    ## Episode end
    All slots share one episode: an epoch, or ``max_steps`` steps. At its end every slot is done
    with ``info["TimeLimit.truncated"] = True`` and ``info["terminal_observation"]`` (its image of the
    batch the classifier would see next; at an epoch's end, the last batch again, as in
    ``NoiseMask-v0``), and the environment resets itself: :meth:`reset` without a seed, i.e. the next
    epoch with the classifier as it is. No slot ever terminates.

    ## Seeding
    :meth:`seed` makes the next :meth:`reset` a fresh run (classifier, optimiser and data order) seeded
    with that seed; the slots share one classifier, so they share one seed. :meth:`reset` without a
    pending seed starts the next epoch.

    ## Arguments
    ``core``: a :class:`~envs.core.PretrainCore` to drive (shared with whoever else holds it), or
    ``data`` and every field of :class:`~envs.core.EnvConfig` as keywords to build one.

    ## Hook
    ``on_step``, when set, is called as ``on_step(result, grid)`` after every classifier step and
    before an automatic reset, with the core's :class:`~envs.core.StepResult` and the grid
    (``num_envs, G, G``) on the device: this is how a pretraining runner sees every step, including
    an epoch's last (``core.exhausted``).
    """

    render_mode = None

    def __init__(self, core: PretrainCore | None = None, data: DataSpec | None = None, **kwargs: Any) -> None:
        if core is None:
            core = PretrainCore(EnvConfig(**kwargs), data=data)
        elif kwargs or data is not None:
            raise ValueError("give either a PretrainCore or the environment's settings, not both")
        self.core = core
        cfg = core.cfg
        c, s, g = core.in_channels, cfg.image_size, cfg.grid
        observation_space = spaces.Box(0, 255, (c, s, s), np.uint8)
        super().__init__(cfg.batch_size, observation_space, spaces.Box(0.0, 1.0, (g, g), np.float32))
        self.on_step: StepHook | None = None
        self._grid: torch.Tensor | None = None

    def current_obs(self) -> np.ndarray:
        """The observation the last :meth:`reset` or :meth:`step` returned, ``(num_envs, C, H, W)`` uint8."""
        return self.core.images.cpu().numpy()

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the next :meth:`reset`: a fresh run from ``seed`` (random when None), the same for every slot."""
        if seed is None:
            seed = int(np.random.randint(0, np.iinfo(np.uint32).max, dtype=np.uint32))
        self._seeds = [seed] * self.num_envs
        return self._seeds

    def reset(self) -> VecEnvObs:
        """A fresh run when :meth:`seed` was called since the last reset, else the next epoch; the first batch."""
        self.core.reset(seed=self._seeds[0])
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{"epoch": self.core.epoch, "step": self.core.global_step} for _ in range(self.num_envs)]
        return self.current_obs()

    def step_async(self, actions: np.ndarray) -> None:
        if self.core.images is None:
            raise RuntimeError("call reset() before step()")
        grid = validate_action(actions, (self.num_envs, *self.action_space.shape))
        self._grid = torch.from_numpy(grid).to(self.core.dev.device, non_blocking=True)

    def step_wait(self) -> VecEnvStepReturn:
        if self._grid is None:
            raise RuntimeError("call step_async() before step_wait()")
        grid, self._grid = self._grid, None
        result = self.core.step(grid=grid)
        if self.on_step is not None:
            self.on_step(result, grid)
        rewards = result.reward.float().cpu().numpy()
        dones = np.full(self.num_envs, result.truncated)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if result.truncated:
            last = self.current_obs()
            for i, info in enumerate(infos):
                info["terminal_observation"] = last[i]
                info["TimeLimit.truncated"] = True
            return self.reset(), rewards, dones, infos
        return self.current_obs(), rewards, dones, infos

    def close(self) -> None:
        pass

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        return list(self._get_indices(indices))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The slots share one environment: its attribute, once per slot."""
        return [getattr(self, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if sorted(self._indices(indices)) != list(range(self.num_envs)):
            raise ValueError(f"the {self.num_envs} slots share one environment; set {attr_name!r} for all of them "
                             "(indices=None)")
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Call the shared environment's method once; its result is given for each slot asked for."""
        result = getattr(self, method_name)(*method_args, **method_kwargs)
        return [result] * len(self._indices(indices))

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(self._indices(indices))
