"""The Beta noise-mask policy: distributions, bounds under extreme outputs, the moving-average base, shapes, size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Beta

from agents.policy import (
    CONC_MAX,
    CONC_MIN,
    SAMPLE_EPS,
    BetaMaskPolicy,
    beta_distribution,
    cell_beta,
    mask_log_prob,
    sample_mask,
)

PARAMS = ("exp", "softplus")


def images(b: int = 4, c: int = 1, s: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=g)


def policy(param: str = "exp", grid: int = 4, channels: int = 1, seed: int = 0, **kwargs) -> BetaMaskPolicy:
    torch.manual_seed(seed)
    return BetaMaskPolicy(channels, grid, param, **kwargs)


def closed_form_log_prob(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Beta(x; a, b) written out, as an independent check of torch's."""
    return (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x) + torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)


def closed_form_entropy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    log_beta_fn = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    return log_beta_fn - (a - 1) * torch.digamma(a) - (b - 1) * torch.digamma(b) + (a + b - 2) * torch.digamma(a + b)


@pytest.mark.parametrize("param", PARAMS)
def test_log_prob_and_entropy_match_torch_beta(param: str) -> None:
    pol = policy(param)
    x = images()
    with torch.no_grad():
        alpha, beta = pol(x)
        dist = beta_distribution(pol, x)
        grid = sample_mask(dist)
        logp = mask_log_prob(dist, grid)
        entropy = dist.entropy()
    # alpha is the concentration of m, beta of 1 - m: the mean mask value is alpha / (alpha + beta)
    torch.testing.assert_close(dist.concentration1, alpha)
    torch.testing.assert_close(dist.concentration0, beta)
    torch.testing.assert_close(dist.mean, alpha / (alpha + beta))
    direct = Beta(alpha.double(), beta.double())
    torch.testing.assert_close(logp.double(), direct.log_prob(grid.double()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), direct.entropy(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logp.double(), closed_form_log_prob(alpha.double(), beta.double(), grid.double()),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), closed_form_entropy(alpha.double(), beta.double()),
                               rtol=1e-4, atol=1e-4)


def test_log_prob_of_edge_values_is_finite() -> None:
    """A mask value of exactly 0 or 1 (a hand-made action) is scored at the nearest kept value, not at -inf."""
    dist = Beta(torch.tensor([[[0.5, 3.0]]]), torch.tensor([[[3.0, 0.5]]]))
    grid = torch.tensor([[[0.0, 1.0]]])
    logp = mask_log_prob(dist, grid)
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp, dist.log_prob(torch.tensor([[[SAMPLE_EPS, 1 - SAMPLE_EPS]]])))


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("sign", (1.0, -1.0))
@pytest.mark.parametrize("update_base", (False, True))
def test_extreme_head_outputs_stay_finite_and_bounded(param: str, sign: float, update_base: bool) -> None:
    pol = policy(param)
    with torch.no_grad():
        pol.head.weight.fill_(sign * 1e4)
        pol.head.bias.fill_(sign * 1e4)
        # mixed signs too: alpha pushed one way, beta the other
        pol.head.weight[1].mul_(-1)
        pol.head.bias[1].mul_(-1)
    x = images(b=8)
    for _ in range(3):  # repeated updates drive the exp base far out as well
        dist = beta_distribution(pol, x, update_base=update_base)
    alpha, beta = dist.concentration1, dist.concentration0
    for conc in (alpha, beta):
        assert torch.isfinite(conc).all()
        assert conc.min() >= CONC_MIN and conc.max() <= CONC_MAX
    assert torch.isfinite(pol.base).all()
    for seed in range(3):
        torch.manual_seed(seed)
        grid = sample_mask(dist)
        assert grid.min() > 0 and grid.max() < 1
        logp = mask_log_prob(dist, grid)
        assert torch.isfinite(logp).all()
    assert torch.isfinite(dist.entropy()).all()
    loss = -mask_log_prob(dist, grid).sum() - dist.entropy().sum()
    loss.backward()
    for p in pol.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_exp_base_is_a_moving_average_of_the_batch_mean_head_output() -> None:
    for seed in range(5):
        pol = policy("exp", seed=seed)
        assert pol.base.shape == (2, 4, 4)
        assert pol.base.min() >= 0 and pol.base.max() < 1  # U(0, 1) initialisation
    assert pol.base.std() > 0.1  # not a constant

    x = images(b=6)
    base0 = pol.base.clone()
    with torch.no_grad():
        head = pol.head_output(x)
        alpha, beta = pol(x)  # no update outside training
    torch.testing.assert_close(pol.base, base0)
    a = 0.9 * base0 + 0.1 * head
    torch.testing.assert_close(alpha, torch.exp(a[:, 0]).clamp(CONC_MIN, CONC_MAX))
    torch.testing.assert_close(beta, torch.exp(a[:, 1]).clamp(CONC_MIN, CONC_MAX))

    with torch.no_grad():
        alpha, beta = pol(x, update_base=True)
    base1 = 0.99 * base0 + 0.01 * head.mean(0)
    torch.testing.assert_close(pol.base, base1)
    a = 0.9 * base1 + 0.1 * head  # the updated base is the one used for this batch
    torch.testing.assert_close(alpha, torch.exp(a[:, 0]).clamp(CONC_MIN, CONC_MAX))
    torch.testing.assert_close(beta, torch.exp(a[:, 1]).clamp(CONC_MIN, CONC_MAX))

    x2 = images(b=6, seed=1)
    with torch.no_grad():
        head2 = pol.head_output(x2)
        pol(x2, update_base=True)
    torch.testing.assert_close(pol.base, 0.99 * base1 + 0.01 * head2.mean(0))


def test_base_takes_no_gradient_and_is_saved() -> None:
    pol = policy("exp")
    names = [n for n, _ in pol.named_parameters()]
    assert "base" not in names
    assert "base" in pol.state_dict()


def test_softplus_param_gives_unimodal_betas() -> None:
    pol = policy("softplus")
    x = images()
    with torch.no_grad():
        head = pol.head_output(x)
        alpha, beta = pol(x, update_base=True)
    torch.testing.assert_close(alpha, (F.softplus(head[:, 0]) + 1).clamp(CONC_MIN, CONC_MAX))
    torch.testing.assert_close(beta, (F.softplus(head[:, 1]) + 1).clamp(CONC_MIN, CONC_MAX))
    assert alpha.min() >= 1 and beta.min() >= 1


@pytest.mark.parametrize(("batch", "channels", "size", "grid"), [
    (1, 1, 16, 4), (5, 1, 32, 8), (3, 3, 64, 16), (2, 3, 100, 16), (2, 1, 224, 64),
])
def test_output_shapes(batch: int, channels: int, size: int, grid: int) -> None:
    pol = policy("exp", grid=grid, channels=channels)
    x = images(b=batch, c=channels, s=size)
    with torch.no_grad():
        alpha, beta = pol(x, update_base=True)
        dist = beta_distribution(pol, x)
        mask = sample_mask(dist)
    assert alpha.shape == beta.shape == mask.shape == (batch, grid, grid)
    assert mask_log_prob(dist, mask).shape == (batch, grid, grid)
    assert mask.dtype == torch.float32


def test_unknown_param_is_refused() -> None:
    with pytest.raises(ValueError, match="parameterisation 'gauss'"):
        BetaMaskPolicy(1, 4, "gauss")


@pytest.mark.parametrize("channels", (1, 3))
def test_policy_is_small(channels: int) -> None:
    """The reference policy (ResNet-10t and two 4096-way heads) has about 10 M parameters; ours must be light."""
    n = sum(p.numel() for p in policy(grid=16, channels=channels).parameters())
    print(f"policy parameters ({channels} channel(s), grid 16): {n}")
    assert n < 100_000
    assert n == sum(p.numel() for p in policy(grid=64, channels=channels).parameters()), \
        "the parameter count should not grow with the grid"


def test_concentration_bounds_are_documented_constants() -> None:
    assert 0 < CONC_MIN < 1 < CONC_MAX < math.inf
    assert 0 < SAMPLE_EPS < 1e-3


def test_trunk_runs_channels_last_with_the_same_outputs() -> None:
    """The convolutions are channels-last (the faster kernels), which changes no value: a contiguous copy of
    the same weights gives the same concentrations."""
    p = policy(grid=8)
    convs = [m for m in p.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    ref = policy(grid=8)
    for m in ref.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous()
    x = images(s=32)
    for got, want in zip(p(x), ref(x)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_grid_drawn_from_a_generator_is_the_one_beta_sample_draws_from_the_same_state() -> None:
    """``sample_mask`` with a generator makes Beta.sample's computation on that generator: the same numbers as the
    global generator gives from the same seed, clamped the same way."""
    dist = cell_beta(torch.rand(4, 3, 3) * 5 + 0.1, torch.rand(4, 3, 3) * 5 + 0.1)
    torch.manual_seed(5)
    expected = sample_mask(dist)
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(sample_mask(dist, generator), expected)
    assert not torch.equal(sample_mask(dist, generator), expected)  # the generator moved on
