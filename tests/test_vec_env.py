"""The VecEnv face (NoiseMaskVecEnv): the contract stable-baselines3's own VecEnv tests check, on our core."""

from __future__ import annotations

import copy

import gymnasium
import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import VecCheckNan, VecMonitor

import envs  # noqa: F401  (registers NoiseMask-v0)
from envs import NoiseMaskVecEnv

B, S, G = 8, 32, 8
TINY = "synthrad?n_train=32&n_val=12&n_test=12"
"""32 training images: an epoch of 4 steps at batch 8."""



def make(spec: str, **kwargs) -> NoiseMaskVecEnv:
    args = {"dataset": spec, "classifier": "smallcnn", "batch_size": B, "image_size": S, "grid": G, "device": "cpu",
            **kwargs}
    return NoiseMaskVecEnv(**args)


def actions(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 1.0, (B, G, G)).astype(np.float32)


def weights(venv: NoiseMaskVecEnv) -> dict[str, torch.Tensor]:
    return copy.deepcopy(venv.core.classifier.state_dict())


def test_spaces(synthrad_spec: str) -> None:
    venv = make(synthrad_spec)
    assert venv.num_envs == B
    assert venv.observation_space.shape == (1, S, S) and venv.observation_space.dtype == np.uint8
    assert venv.action_space.shape == (G, G) and venv.action_space.dtype == np.float32
    assert float(venv.action_space.low.min()) == 0.0 and float(venv.action_space.high.max()) == 1.0
    assert venv.render_mode is None


def test_reset_and_step_shapes(synthrad_spec: str) -> None:
    venv = make(synthrad_spec)
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (B, 1, S, S) and obs.dtype == np.uint8
    assert all(venv.observation_space.contains(o) for o in obs)
    assert venv.reset_infos == [{"epoch": 0, "step": 0}] * B
    obs2, rewards, dones, infos = venv.step(actions())
    assert obs2.shape == obs.shape and obs2.dtype == np.uint8 and not np.array_equal(obs, obs2)
    assert rewards.shape == (B,) and rewards.dtype == np.float32 and np.isfinite(rewards).all()
    assert dones.shape == (B,) and dones.dtype == bool and not dones.any()
    assert isinstance(infos, list) and len(infos) == B and all(isinstance(i, dict) for i in infos)
    assert venv.core.global_step == 1


def test_rewards_are_the_gymnasium_face_per_image_rewards(synthrad_spec: str) -> None:
    """Both faces drive the same core: one VecEnv step gives each slot its image's reward."""
    env = gymnasium.make("NoiseMask-v0", dataset=synthrad_spec, classifier="smallcnn", batch_size=B, image_size=S,
                         grid=G, device="cpu")
    obs_gym, _ = env.reset(seed=3)
    venv = make(synthrad_spec)
    venv.seed(3)
    obs_vec = venv.reset()
    np.testing.assert_array_equal(obs_gym, obs_vec)
    for i in range(3):
        _, reward, _, _, info = env.step(actions(i))
        _, rewards, _, _ = venv.step(actions(i))
        np.testing.assert_array_equal(rewards, info["per_image_reward"])
        assert reward == pytest.approx(float(rewards.mean()), rel=1e-5)


def _rewards(venv: NoiseMaskVecEnv, seed: int, steps: int = 3) -> list[np.ndarray]:
    venv.seed(seed)
    venv.reset()
    return [venv.step(actions(i))[1] for i in range(steps)]


def test_seeding(synthrad_spec: str) -> None:
    a, b, c = make(synthrad_spec), make(synthrad_spec), make(synthrad_spec)
    first = _rewards(a, seed=1)
    for ra, rb in zip(first, _rewards(b, seed=1), strict=True):
        np.testing.assert_array_equal(ra, rb)
    for ra, rb in zip(first, _rewards(a, seed=1), strict=True):  # the same env re-seeded: a fresh run
        np.testing.assert_array_equal(ra, rb)
    assert not all(np.array_equal(ra, rc) for ra, rc in zip(first, _rewards(c, seed=2)))
    assert a.seed(5) == [5] * B  # the slots share one classifier, so they share one seed


def test_reset_without_seed_starts_the_next_epoch_with_the_same_classifier(synthrad_spec: str) -> None:
    venv = make(synthrad_spec)
    venv.seed(0)
    venv.reset()
    venv.step(actions())
    kept = weights(venv)
    venv.reset()
    assert venv.core.epoch == 1 and venv.core.global_step == 1
    for k, v in kept.items():
        assert torch.equal(v, venv.core.classifier.state_dict()[k]), k


def test_epoch_end_truncates_with_terminal_observation_and_auto_resets() -> None:
    venv = make(TINY)
    seen = []
    venv.on_step = lambda result, grid: seen.append((venv.core.epoch, venv.core.exhausted, result.truncated,
                                                     tuple(grid.shape)))
    venv.seed(0)
    venv.reset()
    assert venv.core.steps_per_epoch == 4
    out = [venv.step(actions(i)) for i in range(4)]
    assert [bool(o[2].all()) for o in out] == [False, False, False, True]
    assert not any(o[2].any() for o in out[:3]) and not any("terminal_observation" in i for o in out[:3] for i in o[3])
    obs, _, dones, infos = out[-1]
    assert dones.all()
    for i, info in enumerate(infos):
        assert info["TimeLimit.truncated"] is True
        terminal = info["terminal_observation"]
        assert terminal.shape == (1, S, S) and terminal.dtype == np.uint8
        np.testing.assert_array_equal(terminal, out[-2][0][i])  # an epoch's end repeats its last batch
    # The hook saw every step before the automatic reset; the step returned the next epoch's first batch.
    assert seen == [(0, False, False, (B, G, G))] * 3 + [(0, True, True, (B, G, G))]
    assert venv.core.epoch == 1 and not venv.core.exhausted
    np.testing.assert_array_equal(obs, venv.core.images.numpy())
    assert not venv.step(actions())[2].any()


def test_max_steps_truncates(synthrad_spec: str) -> None:
    venv = make(synthrad_spec, max_steps=2)
    venv.seed(0)
    venv.reset()
    before = venv.core.images.numpy().copy()
    _, _, d1, _ = venv.step(actions())
    after_first = venv.core.images.numpy().copy()
    _, _, d2, infos = venv.step(actions())
    assert not d1.any() and d2.all()
    assert not np.array_equal(infos[0]["terminal_observation"], before[0])
    assert not np.array_equal(infos[0]["terminal_observation"], after_first[0])  # the batch after the last step
    assert venv.core.epoch == 1


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.full((B, G + 1, G), 0.5, np.float32), "shape"),
        (np.full((B - 1, G, G), 0.5, np.float32), "shape"),
        (np.full((B, G, G), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((B, G, G), -0.1, np.float32), r"\[0, 1\]"),
        (np.full((B, G, G), np.nan, np.float32), "NaN"),
        (np.full((B, G, G), "a"), "dtype"),
    ],
)
def test_invalid_action_raises_before_the_classifier_changes(synthrad_spec: str, bad: np.ndarray, match: str) -> None:
    venv = make(synthrad_spec)
    venv.seed(0)
    venv.reset()
    before = weights(venv)
    with pytest.raises(ValueError, match=match):
        venv.step(bad)
    assert venv.core.global_step == 0
    for k, v in before.items():
        assert torch.equal(v, venv.core.classifier.state_dict()[k]), k


def test_step_before_reset_raises(synthrad_spec: str) -> None:
    with pytest.raises(RuntimeError, match="reset"):
        make(synthrad_spec).step(actions())


def test_attributes_and_methods_are_shared_by_all_slots(synthrad_spec: str) -> None:
    venv = make(synthrad_spec)
    assert venv.get_attr("render_mode") == [None] * B and venv.get_attr("num_envs", indices=[0, 2]) == [B, B]
    assert venv.has_attr("core") and not venv.has_attr("no_such_attribute")
    assert venv.env_is_wrapped(gymnasium.Wrapper) == [False] * B
    venv.set_attr("tag", 1)
    assert venv.get_attr("tag", indices=3) == [1]
    with pytest.raises(ValueError, match="share one environment"):
        venv.set_attr("tag", 2, indices=[0])
    assert venv.env_method("seed", 4, indices=[0, 1]) == [[4] * B] * 2


def test_stable_baselines3_wrappers_count_episodes() -> None:
    """VecMonitor reports each slot's episode (one epoch) return and length; VecCheckNan finds nothing."""
    venv = NoiseMaskVecEnv(dataset=TINY, classifier="smallcnn", batch_size=B, image_size=S, grid=G, device="cpu")
    venv.seed(0)
    wrapped = VecCheckNan(VecMonitor(venv), raise_exception=True)
    wrapped.reset()
    total = np.zeros(B)
    for i in range(4):
        _, rewards, dones, infos = wrapped.step(actions(i))
        total += rewards
    assert dones.all()
    for slot, info in enumerate(infos):
        assert info["episode"]["l"] == 4
        assert info["episode"]["r"] == pytest.approx(total[slot], rel=1e-5)
