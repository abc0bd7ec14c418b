"""The noise-mask pretraining environment: mask operations, the core step, Gymnasium and VecEnv faces."""

from gymnasium.envs.registration import register, registry

from envs.core import EnvConfig, PretrainCore, StepResult
from envs.masks import NoiseMask, gaussian_blur, gaussian_kernel1d
from envs.noise_mask_env import NoiseMaskEnv
from envs.vec_env import NoiseMaskVecEnv

if "NoiseMask-v0" not in registry:
    register(id="NoiseMask-v0", entry_point="envs.noise_mask_env:NoiseMaskEnv")

__all__ = ["EnvConfig", "NoiseMask", "NoiseMaskEnv", "NoiseMaskVecEnv", "PretrainCore", "StepResult", "gaussian_blur",
           "gaussian_kernel1d"]
