"""The NoiseMask-v0 environment: Gymnasium's checker, determinism, info, actions, episodes, rewards."""

from __future__ import annotations

import copy
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers NoiseMask-v0)
from classifiers.models import build_classifier
from classifiers.train import NonFiniteError
from envs.masks import gaussian_kernel1d

B, S, G = 8, 32, 8
TINY = "synthrad?n_train=32&n_val=12&n_test=12"
"""32 training images: an epoch of 4 steps at batch 8."""

ALLOWED_WARNINGS: dict[str, str] = {
    # "message substring": "why this warning is unavoidable and harmless",
}
"""Warnings check_env may raise without failing the test. Empty: any warning fails it."""


def make(spec: str, **kwargs) -> gymnasium.Env:
    args = {"dataset": spec, "classifier": "smallcnn", "batch_size": B, "image_size": S, "grid": G,
            "device": "cpu", **kwargs}
    return gymnasium.make("NoiseMask-v0", **args)


def fixed_action(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 1.0, (B, G, G)).astype(np.float32)


def weights(env: gymnasium.Env) -> dict[str, torch.Tensor]:
    return copy.deepcopy(env.unwrapped.core.classifier.state_dict())


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_check_env_passes_without_warnings(synthrad_spec: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = make(synthrad_spec)
        check_env(env.unwrapped)
    unexpected = [f"{w.category.__name__}: {w.message}" for w in caught
                  if not any(sub in str(w.message) for sub in ALLOWED_WARNINGS)]
    assert not unexpected, "check_env warned:\n" + "\n".join(unexpected)


def test_spaces_and_observation(synthrad_spec: str) -> None:
    env = make(synthrad_spec)
    assert env.action_space.shape == (B, G, G) and env.action_space.dtype == np.float32
    assert float(env.action_space.low.min()) == 0.0 and float(env.action_space.high.max()) == 1.0
    assert env.observation_space.shape == (B, 1, S, S) and env.observation_space.dtype == np.uint8
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.uint8 and obs.shape == (B, 1, S, S) and env.observation_space.contains(obs)
    assert info["epoch"] == 0 and info["step"] == 0
    obs2, *_ = env.step(fixed_action())
    assert env.observation_space.contains(obs2) and not np.array_equal(obs, obs2)


def test_step_info(synthrad_spec: str) -> None:
    env = make(synthrad_spec)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(fixed_action())
    assert isinstance(reward, float) and not terminated and not truncated
    pir = info["per_image_reward"]
    assert isinstance(pir, np.ndarray) and pir.shape == (B,) and np.isfinite(pir).all()
    assert reward == pytest.approx(float(pir.mean()), rel=1e-5)
    assert isinstance(info["loss"], float) and info["loss"] > 0
    assert isinstance(info["accuracy"], float) and 0.0 <= info["accuracy"] <= 1.0
    assert info["step"] == 1 and info["epoch"] == 0


def _rewards(env: gymnasium.Env, seed: int, steps: int = 4) -> list[np.ndarray]:
    env.reset(seed=seed)
    return [env.step(fixed_action(i))[4]["per_image_reward"] for i in range(steps)]


def test_same_seed_gives_identical_rewards(synthrad_spec: str) -> None:
    a = _rewards(make(synthrad_spec, seed=3), seed=3)
    b = _rewards(make(synthrad_spec, seed=3), seed=3)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra, rb)
    c = _rewards(make(synthrad_spec, seed=4), seed=4)
    assert not all(np.array_equal(ra, rc) for ra, rc in zip(a, c))


def test_reset_with_seed_restarts_the_run(synthrad_spec: str) -> None:
    env = make(synthrad_spec)
    first = _rewards(env, seed=1)
    again = _rewards(env, seed=1)  # same env, re-seeded: a fresh classifier and the same data order
    for ra, rb in zip(first, again, strict=True):
        np.testing.assert_array_equal(ra, rb)


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (np.full((B, G + 1, G), 0.5, np.float32), "shape"),
        (np.full((B - 1, G, G), 0.5, np.float32), "shape"),
        (np.full((B, G, G, 1), 0.5, np.float32), "shape"),
        (np.full((B, G, G), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((B, G, G), -0.1, np.float32), r"\[0, 1\]"),
        (np.where(np.eye(G, dtype=bool)[None], np.nan, 0.5).repeat(B, 0).astype(np.float32), "NaN"),
        (np.full((B, G, G), np.inf, np.float32), "NaN or infinite"),
        (np.full((B, G, G), "a"), "dtype"),
    ],
)
def test_invalid_action_raises(synthrad_spec: str, action: np.ndarray, match: str) -> None:
    env = make(synthrad_spec)
    env.reset(seed=0)
    before = weights(env)
    with pytest.raises(ValueError, match=match):
        env.step(action)
    assert env.unwrapped.core.global_step == 0
    assert_same_weights(before, weights(env))


def test_boundary_actions_are_valid(synthrad_spec: str) -> None:
    env = make(synthrad_spec)
    env.reset(seed=0)
    for value in (0.0, 1.0):
        env.step(np.full((B, G, G), value, np.float32))
    env.step(np.ones((B, G, G), np.float64))  # any real dtype within [0, 1] is accepted


def test_max_steps_truncates(synthrad_spec: str) -> None:
    env = make(synthrad_spec, max_steps=3)
    env.reset(seed=0)
    flags = [env.step(fixed_action())[3] for _ in range(3)]
    assert flags == [False, False, True]
    env.reset()
    assert [env.step(fixed_action())[3] for _ in range(3)] == [False, False, True]


def test_epoch_end_truncates_and_reset_starts_next_epoch() -> None:
    env = make(TINY)
    _, info = env.reset(seed=0)
    assert info["epoch"] == 0 and env.unwrapped.core.steps_per_epoch == 4
    results = [env.step(fixed_action()) for _ in range(4)]
    assert [r[3] for r in results] == [False, False, False, True]
    assert not any(r[2] for r in results)  # never terminates
    kept = weights(env)
    _, info = env.reset()
    assert info["epoch"] == 1 and info["step"] == 4
    assert_same_weights(kept, weights(env))  # reset() without a seed keeps the classifier as it is
    _, info = env.reset()
    assert info["epoch"] == 2
    _, _, _, truncated, info = env.step(fixed_action())
    assert not truncated and info["epoch"] == 2 and info["step"] == 5


def test_reset_with_seed_reinitialises_the_classifier() -> None:
    env = make(TINY, seed=5)
    env.reset(seed=5)
    initial = weights(env)
    for _ in range(2):
        env.step(fixed_action())
    _, info = env.reset(seed=5)
    assert info["epoch"] == 0 and info["step"] == 0
    assert_same_weights(initial, weights(env))


def test_kwargs_are_honoured() -> None:
    env = make(TINY, blur_kernel=5, blur_sigma=1.5, lr=0.05, reward="adversarial", max_steps=2, seed=7)
    core = env.unwrapped.core
    cfg = core.cfg
    assert (cfg.blur_kernel, cfg.blur_sigma, cfg.lr, cfg.reward, cfg.max_steps, cfg.seed) == (
        5, 1.5, 0.05, "adversarial", 2, 7)
    torch.testing.assert_close(core.mask.kernel, gaussian_kernel1d(5, 1.5))
    # seed: the classifier's initialisation.
    torch.manual_seed(7)
    expected = build_classifier("smallcnn", core.num_classes, 1, S).state_dict()
    assert_same_weights(expected, weights(env))
    env.reset()
    assert core.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    _, r1, _, t1, i1 = env.step(fixed_action())
    _, _, _, t2, _ = env.step(fixed_action())
    assert (t1, t2) == (False, True)  # max_steps
    assert r1 > 0 and r1 == pytest.approx(i1["loss"], rel=1e-5)  # adversarial: +CE
    # blur_kernel=1 disables the blur.
    assert make(TINY, blur_kernel=1).unwrapped.core.mask.kernel.numel() == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"reward": "nope"}, "unknown reward"), ({"blur_kernel": 4}, "odd"), ({"blur_kernel": 65}, "too large"),
     ({"blur_sigma": 0.0}, "sigma"), ({"lr": 0.0}, "learning rate"), ({"max_steps": 0}, "max_steps"),
     ({"grid": 64}, "grid"), ({"batch_size": 0}, "batch size")],
)
def test_invalid_kwargs_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(TINY, **kwargs)


def test_reward_modes() -> None:
    out = {}
    for mode in ("classifiable", "adversarial", "correct"):
        env = make(TINY, reward=mode, seed=2)
        env.reset(seed=2)
        out[mode] = env.step(fixed_action())
    cls_r, cls_i = out["classifiable"][1], out["classifiable"][4]
    adv_r, adv_i = out["adversarial"][1], out["adversarial"][4]
    cor_r, cor_i = out["correct"][1], out["correct"][4]
    # Same seed, same forward pass: the modes differ only in how the loss becomes a reward.
    assert cls_i["loss"] == adv_i["loss"] == cor_i["loss"]
    assert (cls_i["per_image_reward"] <= 0).all() and (adv_i["per_image_reward"] >= 0).all()
    np.testing.assert_array_equal(cls_i["per_image_reward"], -adv_i["per_image_reward"])
    assert cls_r == pytest.approx(-cls_i["loss"], rel=1e-5) and adv_r == pytest.approx(adv_i["loss"], rel=1e-5)
    assert set(np.unique(cor_i["per_image_reward"]).tolist()) <= {0.0, 1.0}
    assert cor_r == pytest.approx(cor_i["accuracy"])


def test_zero_mask_hides_the_images(synthrad_spec: str) -> None:
    """An all-zero mask makes every input identical, so each image's loss depends on its label alone."""
    env = make(synthrad_spec, blur_kernel=1)
    env.reset(seed=0)
    labels = env.unwrapped.core.labels.clone().numpy()
    _, _, _, _, info = env.step(np.zeros((B, G, G), np.float32))
    losses = -info["per_image_reward"]
    for c in np.unique(labels):
        np.testing.assert_allclose(losses[labels == c], losses[labels == c][0], rtol=1e-6)
    assert np.unique(labels).size > 1 and np.unique(losses.round(5)).size == np.unique(labels).size


def test_non_finite_loss_raises_and_changes_nothing(synthrad_spec: str) -> None:
    env = make(synthrad_spec)
    env.reset(seed=0)
    env.step(fixed_action())  # momentum buffers exist and BatchNorm statistics have moved
    core = env.unwrapped.core
    before = weights(env)
    opt_before = copy.deepcopy(core.optimizer.state_dict())
    images_before = core.images.clone()
    grid = torch.from_numpy(fixed_action())
    handed = []
    with pytest.raises(NonFiniteError, match="not finite"):  # on_next_batch: the next batch is fetched first
        core.step(grid, perturb=lambda x: x * float("nan"), on_next_batch=handed.append)
    assert handed == []
    assert_same_weights(before, weights(env))  # parameters and BatchNorm running statistics
    opt_after = core.optimizer.state_dict()
    for k, v in opt_before["state"].items():
        assert torch.equal(v["momentum_buffer"], opt_after["state"][k]["momentum_buffer"])
    assert core.global_step == 1 and torch.equal(core.images, images_before)
    # The environment carries on with a good step, and the batch after it is the one it would have been: the step
    # that failed had fetched it already. A step that fails before a reset leaves nothing behind in the new epoch.
    _, reward, _, _, info = env.step(fixed_action())
    assert np.isfinite(reward) and info["step"] == 2
    unfailed = make(synthrad_spec)
    unfailed.reset(seed=0)
    for _ in range(2):
        unfailed.step(fixed_action())
    other = unfailed.unwrapped.core
    assert torch.equal(core.images, other.images) and torch.equal(core.labels, other.labels)
    with pytest.raises(NonFiniteError, match="not finite"):
        core.step(grid, perturb=lambda x: x * float("nan"), on_next_batch=handed.append)
    core.reset()
    other.reset()
    assert torch.equal(core.images, other.images) and torch.equal(core.labels, other.labels)
