"""The reference recipe's classifier-loss scaling (``reinforce-official-scaled``) and its control (``none-scaled``).

The reference code (ogrenenmakine/Policy-Gradient-Driven-Noise-Mask, ``_policy_gradient/train_one_epoch.py``)
minimises one loss with respect to both networks,
``torch.mean(torch.log(torch.sum(logp.exp(), 1)) * criterion(output, target))``, with ``logp`` the per-cell
log-probabilities (B, G * G) of the sampled mask and ``criterion`` a batch-mean ``CrossEntropyLoss()``. The
tests below build that loss by hand and compare its gradients with ours.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pretrain
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Beta

from agents.baselines import ScaledNoMask
from agents.registry import algo_names, make_agent
from agents.study import StudyConfig
from classifiers.cli import fail_cleanly
from classifiers.train import NonFiniteError
from envs.core import EnvConfig, PretrainCore

GRID = 8


def tiny_core(spec: str, lr: float = 0.1, weight_decay: float = 1e-4) -> PretrainCore:
    """smallcnn at 32 px, batch 8, grid 8, float32 on the CPU, reset to its first batch."""
    cfg = EnvConfig(dataset=spec, classifier="smallcnn", batch_size=8, image_size=32, grid=GRID, blur_kernel=5,
                    blur_sigma=2.0, lr=lr, weight_decay=weight_decay, device="cpu", precision="fp32", seed=0)
    core = PretrainCore(cfg)
    core.reset()
    return core


def reference_loss(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, dist: Beta,
                   grid: torch.Tensor) -> torch.Tensor:
    """The reference code's combined loss, as written there (its mask is (B, G * G))."""
    output = model(inputs)
    mask = grid.flatten(1)
    logp = Beta(dist.concentration1.flatten(1), dist.concentration0.flatten(1)).log_prob(mask)
    return torch.mean(torch.log(torch.sum(logp.exp(), 1)) * F.cross_entropy(output, labels))


def test_scaled_official_step_has_the_reference_gradients(synthrad_spec: str) -> None:
    """One step of ``reinforce-official-scaled``: the classifier's and the policy's gradients are those of the
    reference code's single loss, built by hand from the same inputs, mask and labels."""
    core = tiny_core(synthrad_spec)
    agent = make_agent("reinforce-official-scaled", {"max_grad_norm": 0.0})  # the reference does not clip
    agent.bind(core, total_steps=10)
    classifier_before = copy.deepcopy(core.classifier)
    action = agent.act(core.images)
    inputs = core.mask.apply(core.normalizer(core.images), action.grid)

    policy_params = list(agent.policy.parameters())
    classifier_params = list(classifier_before.parameters())
    loss = reference_loss(classifier_before, inputs, core.labels, agent._dist, action.grid)
    expected = torch.autograd.grad(loss, policy_params + classifier_params, retain_graph=True)
    with torch.no_grad():
        logp = agent._dist.log_prob(action.grid).flatten(1)
        factor = torch.mean(torch.log(torch.sum(logp.exp(), 1)))

    scalars = agent.observe(core.step(grid=action.grid, loss_scale=action.loss_scale))
    ours = [p.grad for p in policy_params] + [p.grad for p in core.classifier.parameters()]
    for name, got, want in zip([f"policy.{n}" for n, _ in agent.policy.named_parameters()]
                               + [f"classifier.{n}" for n, _ in core.classifier.named_parameters()], ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert float(scalars["train/loss_scale"]) == pytest.approx(float(factor), rel=1e-6)
    assert float(factor) > 1  # the check would not tell a scaled loss from an unscaled one otherwise


def test_the_factor_is_a_constant_and_only_with_the_option(synthrad_spec: str) -> None:
    """The scale is detached; ``reinforce-official`` (the default) leaves the classifier's loss unscaled."""
    core = tiny_core(synthrad_spec)
    scaled = make_agent("reinforce-official-scaled")
    scaled.bind(core, total_steps=10)
    action = scaled.act(core.images)
    assert action.loss_scale.shape == () and not action.loss_scale.requires_grad
    plain = make_agent("reinforce-official")
    plain.bind(core, total_steps=10)
    assert plain.act(core.images).loss_scale is None
    assert "train/loss_scale" not in plain.observe(core.step(grid=plain._grid))
    # the flag on reinforce-official is the same agent as the registered name
    args = pretrain.parse_args(["--algo", "reinforce-official", "--scale-classifier-loss"])
    assert make_agent(args.algo, pretrain.config_from_args(args).agent).cfg.scale_classifier_loss


def params(core: PretrainCore) -> list[torch.Tensor]:
    return [p.detach().clone() for p in core.classifier.parameters()]


@pytest.mark.parametrize(("k", "steps"), [(4.0, 4), (3.0, 2)])
def test_none_scaled_is_plain_training_at_k_times_the_rate_and_wd_over_k(k: float, steps: int,
                                                                          synthrad_spec: str) -> None:
    """SGD with momentum on k * CE at lr l and weight decay w takes the steps of plain SGD on CE at lr k * l and
    weight decay w / k: the gradient k * dCE + w * theta is k times dCE + (w / k) * theta, so the momentum
    buffer is k times larger and lr times buffer the same. Keeping the weight decay at w is a different run.

    With k a power of two every product is exact and the runs agree bit for bit, step after step. With k = 3
    they agree to rounding for the first steps only: a 32 px, batch-8 network with BatchNorm amplifies a
    rounding difference of 1e-7 to 1e-4 within about four steps, and so would any two runs that differ in it."""
    lr, wd = 0.02, 1e-2
    scaled, plain, plain_same_wd = (tiny_core(synthrad_spec, lr, wd), tiny_core(synthrad_spec, k * lr, wd / k),
                                    tiny_core(synthrad_spec, k * lr, wd))
    control = make_agent("none-scaled", {"loss_scale": k})
    control.bind(scaled, total_steps=steps)
    exact = math.log2(k).is_integer()
    tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    for _ in range(steps):
        action = control.act(scaled.images)
        assert float(action.loss_scale) == k
        a = scaled.step(grid=action.grid, loss_scale=action.loss_scale)
        b = plain.step()
        plain_same_wd.step()
        torch.testing.assert_close(a.loss, b.loss, **tolerance)  # the returned losses are unscaled
        for p, q in zip(params(scaled), params(plain)):
            torch.testing.assert_close(p, q, **tolerance)
    buffers = zip(scaled.optimizer.state_dict()["state"].values(), plain.optimizer.state_dict()["state"].values())
    for p, q in buffers:
        want = k * q["momentum_buffer"]
        # a gradient's rounding is relative to its largest entries (the first convolution sums 8,192 terms)
        atol = 0.0 if exact else 1e-4 * want.abs().max().item()
        torch.testing.assert_close(p["momentum_buffer"], want, rtol=0.0, atol=atol)
    gap = max((p - q).abs().max().item() for p, q in zip(params(scaled), params(plain_same_wd)))
    assert gap > 1e-4, gap


def test_none_scaled_defaults_to_log_g_squared(synthrad_spec: str) -> None:
    core = tiny_core(synthrad_spec)
    agent = make_agent("none-scaled")
    agent.bind(core, total_steps=1)
    action = agent.act(core.images)
    assert action.grid is None and action.perturb is None
    assert float(action.loss_scale) == pytest.approx(math.log(GRID * GRID))
    assert agent.observe(core.step(loss_scale=action.loss_scale)) == {"train/loss_scale": math.log(GRID * GRID)}


def run_args(spec: str, run_dir: Path, algo: str, *extra: str) -> list[str]:
    return ["--algo", algo, "--dataset", spec, "--classifier", "smallcnn", "--image-size", "32", "--grid",
            str(GRID), "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "8", "--max-steps", "4",
            "--device", "cpu", "--precision", "fp32", "--log-every", "2", "--run-dir", str(run_dir), *extra]


@pytest.mark.parametrize(("algo", "extra", "expected"), [
    ("none-scaled", (), math.log(GRID * GRID)),
    ("none-scaled", ("--loss-scale", "2.5"), 2.5),
    ("reinforce-official-scaled", (), None),
])
def test_pretrain_logs_the_factor(algo: str, extra: tuple[str, ...], expected: float | None, synthrad_spec: str,
                                  tmp_path: Path) -> None:
    run_dir = tmp_path / algo
    assert pretrain.main(run_args(synthrad_spec, run_dir, algo, *extra)) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["train/loss_scale"] for r in rows if "train/loss" in r]
    assert len(logged) == 2, rows
    for value in logged:
        if expected is None:  # near log(G * G) at the start: Beta(exp(a), exp(b)) with a, b near 0.5
            assert math.isfinite(value) and abs(value - math.log(GRID * GRID)) < 1.0, value
        else:
            assert value == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("algo", "extra", "message"), [
    ("reinforce", ("--scale-classifier-loss",), "scale_classifier_loss needs objective 'official'"),
    ("reinforce", ("--objective", "reinforce", "--scale-classifier-loss"), "needs objective 'official'"),
    ("none-scaled", ("--loss-scale", "0"), "loss scale 0.0 must be a positive, finite number"),
    ("none-scaled", ("--loss-scale", "-2"), "loss scale -2.0 must be a positive, finite number"),
    ("none-scaled", ("--loss-scale", "nan"), "loss scale nan must be a positive, finite number"),
    ("none-scaled", ("--loss-scale", "inf"), "loss scale inf must be a positive, finite number"),
])
def test_bad_combinations_are_refused_in_one_line(algo: str, extra: tuple[str, ...], message: str,
                                                  synthrad_spec: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "refused"
    assert fail_cleanly(lambda: pretrain.main(run_args(synthrad_spec, run_dir, algo, *extra))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not run_dir.exists()


def test_scaled_official_option_needs_the_official_objective() -> None:
    with pytest.raises(ValueError, match="needs objective 'official'"):
        make_agent("reinforce", {"scale_classifier_loss": True})
    with pytest.raises(ValueError, match="positive, finite"):
        ScaledNoMask(loss_scale=float("inf"))


def test_a_non_finite_scale_leaves_the_classifier_untouched(synthrad_spec: str) -> None:
    core = tiny_core(synthrad_spec)
    before = copy.deepcopy(core.classifier.state_dict())
    with pytest.raises(NonFiniteError, match="loss scale"):
        core.step(loss_scale=torch.tensor(float("nan")))
    for name, value in core.classifier.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_both_names_are_study_methods() -> None:
    """compare.py takes registry names; the study validates them with the plain-training baseline."""
    assert {"none-scaled", "reinforce-official-scaled"} <= set(algo_names())
    StudyConfig(methods=("none", "none-scaled", "reinforce-official-scaled")).validate()
