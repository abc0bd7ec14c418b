"""The budgeted objective: each mask held at a budget, the policy rewarded for what it hides from a live classifier."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pretrain
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Beta

from agents.policy import sample_mask
from agents.registry import BUDGETED_ENV, environment_for, make_agent
from agents.reinforce import Reinforce
from agents.runner import PretrainConfig, PretrainRunner
from envs.core import EnvConfig, PretrainCore


def test_budget_algos_set_their_environment_unless_the_user_did() -> None:
    env = environment_for("reinforce-budget", EnvConfig())
    assert (env.reward, env.mask_budget, env.reward_forward, env.reward_reference) == (
        "adversarial", 0.5, "eval", "constant")
    assert BUDGETED_ENV == {"reward": "adversarial", "mask_budget": 0.5, "reward_forward": "eval",
                            "reward_reference": "constant"}
    assert environment_for("reinforce-budget", EnvConfig(mask_budget=0.3)).mask_budget == 0.3
    assert environment_for("reinforce", EnvConfig()) == EnvConfig()
    cfg = make_agent("reinforce-budget", {}).cfg
    assert (cfg.param, cfg.budget_concentration, cfg.policy_lr, cfg.normalize_advantage) == (
        "softplus", 2.0, 0.03, True)
    assert make_agent("reinforce-budget", {"param": "exp"}).cfg.param == "exp"
    assert make_agent("reinforce-budget", {"normalize_advantage": False}).cfg.normalize_advantage is False
    with pytest.raises(ValueError, match="mask budget 1.0"):
        EnvConfig(mask_budget=1.0).validate()


@pytest.mark.parametrize(("settings", "message"), [
    ({"reward_forward": "test"}, r"unknown reward_forward 'test'; use one of train, eval$"),
    ({"reward_reference": "clean"}, r"unknown reward_reference 'clean'; use one of none, constant, sampled$"),
    ({"reward_reference": "constant"}, r"reward_reference 'constant' .* needs a mask_budget; set one"),
])
def test_reward_options_are_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        EnvConfig(**settings).validate()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"budget_concentration": -1.0}, r"budget_concentration -1.0 must lie in \[0.1, 100.0\]"),
    ({"budget_concentration": float("nan")}, r"budget_concentration nan must lie in"),
    ({"budget_concentration": 2.0, "objective": "official"}, r"budget_concentration needs objective 'reinforce'"),
])
def test_budget_concentration_is_refused_in_one_line(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        Reinforce(**options)
    assert "\n" not in str(err.value)


def tiny_core(**settings) -> PretrainCore:
    cfg = EnvConfig(dataset="synthrad?n_train=48&n_val=24&n_test=24", image_size=32, grid=4, blur_kernel=5,
                    blur_sigma=2.0, batch_size=8, device="cpu", precision="fp32", seed=0, mask_budget=0.5,
                    reward="adversarial", **settings)
    core = PretrainCore(cfg)
    core.reset(seed=0)
    return core


def test_budget_concentration_needs_a_budget() -> None:
    core = tiny_core()
    core.cfg.mask_budget = None
    with pytest.raises(ValueError, match="budget_concentration needs an environment with a mask budget"):
        Reinforce(budget_concentration=2.0).bind(core, 10)


def test_logits_far_out_keep_a_pattern_and_a_gradient() -> None:
    """The allocation reads its logits centred and softly bounded: a common level changes nothing, equal logits give
    the constant budget, and logits that drifted far out (as a 1,240-step run's did, to -1,430) still give a
    non-constant held mask with a gradient, where the raw sigmoid underflows to the constant budget and none."""
    from agents.reinforce import LOGIT_BOUND, bounded_contrast
    from envs.masks import hold_mean

    torch.manual_seed(0)
    d = torch.randn(2, 4, 4)
    torch.testing.assert_close(bounded_contrast(d + 100.0), bounded_contrast(d))
    assert torch.equal(bounded_contrast(torch.full((1, 4, 4), 3.0)), torch.zeros(1, 4, 4))
    far = (-1000.0 + 300.0 * torch.rand(2, 4, 4)).requires_grad_()
    raw = hold_mean(torch.sigmoid(far), 0.5)
    assert torch.equal(raw, torch.full_like(raw, 0.5))  # the collapse: underflow, then the constant budget
    held = hold_mean(torch.sigmoid(bounded_contrast(far)), 0.5)
    assert held.std() > 0.1 and bounded_contrast(far).abs().max() <= LOGIT_BOUND
    (held * torch.randn_like(held)).sum().backward()
    assert far.grad.abs().sum() > 0


def test_budget_concentration_holds_the_cell_means_at_the_budget_and_fixes_the_concentration() -> None:
    """Every image's mean cell mean is the budget, every cell's alpha + beta is k, and a network that gives every cell
    the same concentrations is Beta(1, 1) at k = 2."""
    core = tiny_core()
    agent = Reinforce(param="softplus", budget_concentration=3.0)
    agent.bind(core, 10)
    with torch.no_grad():
        agent.policy.head.weight.normal_(0, 3.0)  # cells that differ, none at a clamp
    dist = agent.mask_distribution(core.images)
    torch.testing.assert_close(dist.mean.mean((1, 2)), torch.full((8,), 0.5))
    torch.testing.assert_close(dist.concentration1 + dist.concentration0, torch.full_like(dist.mean, 3.0))
    assert dist.mean.std() > 0.05
    agent = Reinforce(param="softplus", budget_concentration=2.0)
    agent.bind(core, 10)
    with torch.no_grad():
        agent.policy.head.weight.zero_()
    dist = agent.mask_distribution(core.images)
    torch.testing.assert_close(dist.concentration1, torch.ones_like(dist.mean))
    torch.testing.assert_close(dist.concentration0, torch.ones_like(dist.mean))
    grid = agent.act(core.images).grid  # the agent samples from the same held distribution
    assert grid.shape == (8, 4, 4) and agent._dist.concentration1.requires_grad


def run_steps(core: PretrainCore, grids: list[torch.Tensor]) -> list[torch.Tensor]:
    return [core.step(grid=g).reward for g in grids]


def test_the_reward_pass_leaves_the_training_run_unchanged() -> None:
    """The eval-mode reward forward and the train-mode reference forward leave no trace: with the same grids, every
    variant trains the classifier to the same weights and BatchNorm statistics, bit for bit."""
    torch.manual_seed(1)
    grids = [torch.rand(8, 4, 4) for _ in range(4)]
    states = []
    for forward, reference in (("train", "none"), ("eval", "none"), ("train", "constant"), ("eval", "constant")):
        core = tiny_core(reward_forward=forward, reward_reference=reference)
        run_steps(core, grids)
        states.append(core.classifier.state_dict())
    for state in states[1:]:
        for key, value in states[0].items():
            assert torch.equal(value, state[key]), key


def test_rewards_are_the_cross_entropies_they_name() -> None:
    """``eval``: the eval-mode cross-entropy of the masked batch before the update; ``constant``: minus the same for the
    image times the budget; ``train`` with ``constant``: the training forward's cross-entropy minus the reference's
    train-mode one (its own batch statistics)."""
    torch.manual_seed(2)
    grid = torch.rand(8, 4, 4)
    for forward, reference in (("eval", "none"), ("eval", "constant"), ("train", "constant")):
        core = tiny_core(reward_forward=forward, reward_reference=reference)
        model, labels = core.classifier, core.labels
        x = core.inputs(core.images, grid)
        ref = core.normalizer(core.images) * 0.5
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.train(forward == "train")
        with torch.no_grad():
            expected = F.cross_entropy(model(x), labels, reduction="none")
            if reference == "constant":
                model.load_state_dict(saved)
                expected = expected - F.cross_entropy(model(ref), labels, reduction="none")
        model.load_state_dict(saved)
        model.train()
        torch.testing.assert_close(core.step(grid=grid).reward, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algo", ["reinforce-budget", "ppo-budget", "a2c-budget"])
def test_the_environment_applies_the_budget_and_says_so(tmp_path: Path, algo: str) -> None:
    """A budgeted run records its settings, applies every grid at the budget (logged mask/mean), and its config.json
    shows the agent defaults the name chose. PPO and A2C reach the budgeted objective through the same environment."""
    run = tmp_path / "run"
    argv = ["--algo", algo, "--dataset", "synthrad?n_train=96&n_val=24&n_test=24", "--image-size", "32",
            "--grid", "8", "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "16", "--max-steps", "8",
            "--device", "cpu", "--log-every", "2", "--mask-budget", "0.3", "--run-dir", str(run)]
    assert pretrain.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["env"]["reward"] == "adversarial" and config["env"]["mask_budget"] == 0.3
    assert config["env"]["reward_forward"] == "eval" and config["env"]["reward_reference"] == "constant"
    if algo == "reinforce-budget":
        assert config["agent"]["param"] == "softplus"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "mask/mean" in line]
    assert all(r["mask/mean"] == pytest.approx(0.3, abs=1e-5) for r in rows)


def test_flags_the_user_gives_stay_even_at_their_defaults(tmp_path: Path) -> None:
    """``--reward-forward train --reward-reference none --reward classifiable --no-normalize-advantage`` with
    reinforce-budget: the run uses what was asked, though each is the default the algo would otherwise replace."""
    run = tmp_path / "run"
    argv = ["--algo", "reinforce-budget", "--dataset", "synthrad?n_train=96&n_val=24&n_test=24", "--image-size", "32",
            "--grid", "8", "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "16", "--max-steps", "2",
            "--device", "cpu", "--reward", "classifiable", "--reward-forward", "train", "--reward-reference", "none",
            "--no-normalize-advantage", "--run-dir", str(run)]
    assert pretrain.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["env"]["reward"], config["env"]["reward_forward"], config["env"]["reward_reference"],
            config["env"]["mask_budget"]) == ("classifiable", "train", "none", 0.5)
    assert config["agent"]["normalize_advantage"] is False
    assert environment_for("reinforce-budget", EnvConfig(), chosen=("reward_forward",)).reward_forward == "train"


# --- learning with a live classifier --------------------------------------------------------------------------------

LIVE_SYNTHRAD = "synthrad?n_train=1200&n_val=64&n_test=24"
"""80 steps of batch 32 see each training image about twice; the probe is the 64 validation images."""


def budgeted_run(run_dir: Path, seed: int, agent: dict, steps: int = 80) -> tuple[PretrainRunner, float]:
    """``reinforce-budget`` with its registered defaults (but ``agent``) on synthrad at 32 px (grid 8, blur 5 / 2,
    batch 32), the classifier training as usual (SGD lr 0.1 on the masked batches); the runner and its wall time."""
    env = EnvConfig(dataset=LIVE_SYNTHRAD, image_size=32, grid=8, blur_kernel=5, blur_sigma=2.0, batch_size=32,
                    device="cpu", precision="fp32", seed=seed)
    cfg = PretrainConfig(algo="reinforce-budget", env=env, agent=agent, epochs=100, max_steps=steps, log_every=steps,
                         image_every=10**6, ckpt_every=10**6, run_dir=str(run_dir))
    start = time.perf_counter()
    runner = PretrainRunner(cfg)
    runner.run()
    return runner, time.perf_counter() - start


@torch.no_grad()
def probe_cross_entropy(runner: PretrainRunner, draws: int = 8) -> tuple[float, float]:
    """The final classifier's mean cross-entropy (eval mode) on the probe images under the policy's masks and under
    Beta(1, 1) masks, both held at the budget, each averaged over ``draws`` seeded draws."""
    core, probe = runner.core, runner.probe
    dist = runner.agent.mask_distribution(probe.images)
    uniform = Beta(torch.ones_like(dist.concentration1), torch.ones_like(dist.concentration0))
    core.classifier.eval()
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for source in (dist, uniform):
            ce = [F.cross_entropy(core.classifier(core.inputs(probe.images, sample_mask(source))), probe.labels)
                  for _ in range(draws)]
            out.append(float(torch.stack(ce).mean()))
    core.classifier.train()
    return out[0], out[1]


@pytest.mark.parametrize("learning", ["on", "off"])
def test_budgeted_policy_learns_to_hide_the_content_from_a_live_classifier(tmp_path: Path, learning: str) -> None:
    """With the classifier training as usual, 80 steps of ``reinforce-budget`` (its defaults, batch 32) teach the
    policy to put the noise on the content, in at least two of the seeds 0, 1 and 2: the expected mask on the anatomy
    and lesions ends more than 0.15 below the mask on the background (``content_gap`` < -0.15, 0 at the start), the
    cell means spread apart (``cell_spread`` > 0.1) and the Beta moves away from where it started (``kl_initial`` >
    0.5). On synthrad the class is the anatomy and the lesion, so hiding them is the direction the adversarial reward
    implies. With the policy's update switched off (policy lr 1e-12) nothing moves in any seed: the policy stays at
    Beta(1, 1) everywhere (no moving-average base to drift), and the margins fail.

    Why three seeds: the trajectory depends on the CPU's kernels, and one seed in eight has not moved yet at 80 steps.
    On one thread, seeds 0-7 learned in seven of eight on each of two CPUs: on the earlier sessions' (content gaps from
    -0.24 to -0.61, cell spreads 0.16 to 0.37, kl_initial 1.6 to 13, 13-17 s each) seed 7 had not moved (kl_initial
    0.009); on an AMD EPYC with AVX-512 (family 25, model 17) seed 0 had not (kl_initial 0.105), the others gave gaps
    from -0.29 to -0.57 and kl_initial 3.0 to 8.6, 7-9 s each. At 100 steps seed 1 had found the other pattern that
    raises the cross-entropy, a dimmed background (docs/budget-notes.md), so longer runs are no safer. Not asserted:
    that the final classifier finds the policy's masks harder than Beta(1, 1) masks. It trained on the policy's masks
    and never on uniform ones, and in 6 of the 7 seeds that learned it ends up finding its own masks easier (the
    figures are printed).
    """
    learned = []
    for seed in (0, 1, 2):
        runner, seconds = budgeted_run(tmp_path / f"run{seed}", seed=seed,
                                       agent={} if learning == "on" else {"policy_lr": 1e-12})
        d = {k.split("/")[1]: float(v) for k, v in runner.diagnostics().items()}
        ce_policy, ce_uniform = probe_cross_entropy(runner)
        print(f"learning {learning}, seed {seed}: {seconds:.1f} s; kl_initial {d['kl_initial']:.4f}, "
              f"cell_spread {d['cell_spread']:.4f}, image_spread {d['image_spread']:.4f}, "
              f"content_gap {d['content_gap']:+.4f} (image-specific {d['content_gap_image_specific']:+.4f}), "
              f"mask on background {d['mask_on_background']:.3f} / anatomy {d['mask_on_anatomy']:.3f} / lesion "
              f"{d['mask_on_lesion']:.3f}; probe CE under the policy's masks {ce_policy:.3f}, "
              f"under Beta(1, 1) masks {ce_uniform:.3f}")
        learned.append(d["content_gap"] < -0.15 and d["cell_spread"] > 0.1 and d["kl_initial"] > 0.5)
        if learning == "off":
            assert d["kl_initial"] < 1e-6 and abs(d["content_gap"]) < 0.01 and d["cell_spread"] < 0.01, d
    assert sum(learned) >= 2 if learning == "on" else not any(learned), learned
