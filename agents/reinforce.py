"""Our REINFORCE agent: a Beta noise-mask policy trained with the score-function estimator.

Per step:

1. the policy gives per-cell Beta concentrations for the batch and a mask grid is sampled;
2. the environment applies it and takes one classifier step; each image gets its own reward;
3. the policy minimises ``-mean_i[(r_i - b) * log p(m_i)] - c_H * mean_i[H_i]`` where
   ``log p(m_i)`` is the *joint* log-probability of image i's mask (the sum over cells), ``b``
   a moving-average baseline of the batch-mean reward, and ``H_i`` the mask's entropy.

``budget_concentration=k`` (with a mask budget ``b``; the ``reinforce-budget`` default) changes what the policy may
choose: the network's two outputs give each cell's mean as a logit, ``mu_c = sigmoid(l_alpha - l_beta)``, the means are
held at the budget (``envs.masks.hold_mean``, differentiable), and cell c is drawn from Beta(k * mu_c, k * (1 - mu_c))
(:class:`BudgetAllocation`). The mean grid then spends exactly the budget, and the concentration is fixed, so the
policy decides *where* the noise goes (which cells get low means) but cannot buy more noise by changing the Beta's
shape: held at a mean budget, i.i.d. cells from any Beta(alpha, beta) become masks whose spread is about ``b`` times
the Beta's coefficient of variation, and the adversarial reward drives an unconstrained policy toward the largest one
(see docs/budget-notes.md). With k = 2 a policy whose network outputs the same logits in every cell is Beta(1, 1): the
uniform mask.

``objective="official"`` replaces step 3 by the reference code's objective,
``mean_i[log(sum_cells(exp(log p_cell)))] * mean_i[CE_i]``, for comparison: it uses a log-sum-exp
of per-cell densities instead of the joint log-probability, one batch-mean signal for all
images and no baseline.

The reference code minimises that one product with respect to both networks, so its classifier's
cross-entropy is also multiplied by the batch-mean log-sum-exp (a constant to the classifier: about
8.5 at G = 64, log(G * G) = 8.32 when every cell is Beta(1, 1)); with SGD that is a learning rate
about 8.5 times larger. By default we leave the factor out, so the classifier trains the same way
under both objectives; ``scale_classifier_loss=True`` (registered as ``reinforce-official-scaled``)
puts it back, computed from the step's own sampled grid and logged as ``train/loss_scale``, to
reproduce the reference recipe whole. ``agents.baselines.ScaledNoMask`` (``none-scaled``) is the
matching control: plain training at a fixed loss scale.

Under torch.distributed the baseline, the advantage normalisation, the official objective's
batch mean and the classifier's loss scale use all-reduced statistics, and DDP averages the
gradients, so N processes of batch B take the same steps as one process of batch N*B. (The
reference code, under DDP, scales each process's loss by its own factor.)

On a CPU with cores to spare (:func:`spare_core`: twice the classifier's torch threads, as in ``make demo``'s one
thread on 2 cores), step 3 runs on a second thread while the classifier's backward pass and its SGD step run on this
one: the environment hands the rewards over as soon as the classifier's forward pass gives them
(``Action.on_reward``), and the next ``act`` waits for the update. Each thread does the same operations
in the same order as before, so a run is the same, bit for bit, with or without it (tests/test_reinforce.py). The
environment also hands over the next batch (``Action.on_next_batch``), and the same thread then computes the policy's
forward pass for it (trunk, head, concentrations, the moving-average base's next value and the Beta) and draws its
grid, after the update; ``act`` stores the base and raises on non-finite concentrations. The grids come from the
agent's own generator (:attr:`Reinforce.generator`, in its checkpoints), drawn in the same order on either thread.
``NOISEMASK_OVERLAP_UPDATE=0`` in the environment (or ``Reinforce.overlap = False``) keeps everything on one thread.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.distributions import Beta
from torch.nn.parallel import DistributedDataParallel

from agents.base import Action, Agent
from agents.policy import (
    CONC_MAX,
    CONC_MIN,
    PARAMS,
    BetaMaskPolicy,
    beta_distribution,
    cell_beta,
    checked_beta,
    keep_base,
    mask_log_prob,
    sample_mask,
)
from classifiers.checkpoint import derived_seed
from classifiers.data import available_cores
from classifiers.distributed import all_mean, is_distributed, world_size
from classifiers.train import check_finite
from envs.core import PretrainCore, StepResult
from envs.masks import hold_mean

OBJECTIVES = ("reinforce", "official")
SAMPLER_STREAM = 0x6D61736B
"""Mixed into the seed of the agents' own generators, so that they draw other numbers than the global one."""
_UPDATE_THREAD: ThreadPoolExecutor | None = None
OVERLAP_ENV = "NOISEMASK_OVERLAP_UPDATE"


def sampler_seed(seed: int, *more: int) -> int:
    """The seed of a REINFORCE agent's own generator for the run's ``seed`` (and ``more``, such as a step)."""
    return derived_seed(seed, SAMPLER_STREAM, *more)


def on_update_thread(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` on the one thread every agent in this process computes overlapped policy updates on (in the
    order submitted: an agent's update, then its forward pass for the next batch; it waits for both before its next
    step), with the calling thread's number of torch threads: a new thread starts with OpenMP's default (every core),
    and oneDNN's kernels then split their work otherwise, so the sums would differ in their last bits from the same
    update on the calling thread."""
    global _UPDATE_THREAD
    if _UPDATE_THREAD is None:
        _UPDATE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-update")
    threads = torch.get_num_threads()

    def run() -> Any:
        torch.set_num_threads(threads)  # per thread for OpenMP; torch.get_num_threads() here would say the caller's
        return fn(*args)

    return _UPDATE_THREAD.submit(run)


def spare_core(core: PretrainCore) -> bool:
    """Whether a policy update on a second thread can run beside ``core``'s classifier step without slowing it: on a
    CPU with cores enough for the classifier's torch threads, as many again for the update, and the data loader's
    workers,
    outside torch.distributed (its collectives must keep one order on every rank), unless the environment variable
    ``NOISEMASK_OVERLAP_UPDATE=0`` (several runs side by side on the same cores) says no. On a GPU the kernels already
    queue asynchronously, so there is nothing to gain."""
    if core.dev.device.type != "cpu" or is_distributed() or os.environ.get(OVERLAP_ENV, "1") == "0":
        return False
    threads = torch.get_num_threads()  # the classifier's, and the update's (on_update_thread)
    return available_cores() >= 2 * threads + core.loader.num_workers
BASELINES = ("moving", "batch")


@dataclass
class ReinforceConfig:
    """REINFORCE hyperparameters."""

    objective: str = "reinforce"
    """``reinforce`` (per-image reward, joint log-probability, baseline) or ``official`` (the reference code's)."""
    param: str = "exp"
    """Beta parameterisation: ``exp`` (the paper's, with moving-average base) or ``softplus``."""
    policy_lr: float | None = None
    """Policy SGD learning rate (None: the classifier's lr / 10)."""
    momentum: float = 0.9
    """Policy SGD momentum."""
    baseline: str = "moving"
    """``moving``: a moving average of the batch-mean reward (``baseline_momentum``); ``batch``: for each image, the
    mean reward of the *other* images of the (global) batch (leave-one-out: unbiased, and free of the lag a moving
    average has when the reward drifts as the classifier learns)."""
    baseline_momentum: float = 0.9
    """Weight of the old value in the moving-average reward baseline."""
    normalize_advantage: bool = False
    """Divide advantages by their standard deviation over the (global) batch."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    max_grad_norm: float = 1.0
    """Clip the policy gradient's global norm to this (0 disables)."""
    policy_width: int = 16
    """Channels of the policy's convolutional trunk."""
    policy_input_size: int = 64
    """The policy sees the image resized to at most this side."""
    budget_concentration: float | None = None
    """With the environment's mask budget: hold the cells' Beta means at the budget and their concentration
    ``alpha + beta`` at this value, so the policy chooses only where the noise goes (module docstring); 2 starts at
    Beta(1, 1). None or 0: the policy's own concentrations."""
    scale_classifier_loss: bool = False
    """With ``objective="official"``: multiply the classifier's loss by the batch mean of the log-sum-exp
    term, as the reference code does (see the module docstring)."""

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if self.scale_classifier_loss and self.objective != "official":
            raise ValueError(f"scale_classifier_loss needs objective 'official' (got {self.objective!r}): the factor "
                             "is the reference objective's log-sum-exp term; use --algo reinforce-official-scaled, "
                             "or none-scaled for plain training at a fixed loss scale")
        if self.param not in PARAMS:
            raise ValueError(f"unknown policy parameterisation {self.param!r}; use one of {', '.join(PARAMS)}")
        if self.policy_lr is not None and not (self.policy_lr > 0 and math.isfinite(self.policy_lr)):
            raise ValueError(f"policy learning rate {self.policy_lr} must be a positive finite number (default: the "
                             "classifier's lr / 10)")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; use one of {', '.join(BASELINES)}")
        if not 0 <= self.baseline_momentum < 1:
            raise ValueError(f"baseline momentum {self.baseline_momentum} must lie in [0, 1)")
        if self.budget_concentration and not (
                math.isfinite(self.budget_concentration) and 2 * CONC_MIN <= self.budget_concentration <= CONC_MAX):
            raise ValueError(f"budget_concentration {self.budget_concentration} must lie in [{2 * CONC_MIN}, "
                             f"{CONC_MAX}] (2: Beta(1, 1) at an even spread), or be 0 or None (off)")
        if self.budget_concentration and self.objective != "reinforce":
            raise ValueError("budget_concentration needs objective 'reinforce' (the budgeted objective); "
                             f"got {self.objective!r}")
        if self.entropy_coef < 0 or self.max_grad_norm < 0:
            raise ValueError("entropy_coef and max_grad_norm must be 0 or more")


def reinforce_loss(log_prob: torch.Tensor, advantage: torch.Tensor, entropy: torch.Tensor,
                   entropy_coef: float) -> torch.Tensor:
    """``-mean(advantage * log_prob) - entropy_coef * mean(entropy)``; each argument has shape (B,).

    With ``entropy_coef == 0`` the entropy stays out of the graph (no backward through its digammas)."""
    loss = -(advantage.detach() * log_prob).mean()
    return loss - entropy_coef * entropy.mean() if entropy_coef else loss


def log_sum_exp_term(cell_log_prob: torch.Tensor) -> torch.Tensor:
    """``mean_b(log(sum_cells(exp(log p))))`` of per-cell log-probabilities (B, G, G): the reference
    objective's policy factor, and the factor it multiplies the classifier's loss by."""
    return torch.logsumexp(cell_log_prob.flatten(1), dim=1).mean()


def official_loss(cell_log_prob: torch.Tensor, ce_mean: torch.Tensor) -> torch.Tensor:
    """The reference code's objective: ``mean_b(log(sum_cells(exp(log p)))) * CE_batch_mean``.

    Args:
        cell_log_prob: per-cell log-probabilities, (B, G, G).
        ce_mean: the batch-mean cross-entropy of the classifier (treated as a constant).
    """
    return log_sum_exp_term(cell_log_prob) * ce_mean.detach()


LOGIT_BOUND = 6.0
"""The cells' mean logits, centred per image, are kept within +-LOGIT_BOUND (sigmoid 0.0025 to 0.9975), softly."""


def bounded_contrast(logit: torch.Tensor) -> torch.Tensor:
    """Each image's cell logits (B, G, G) centred on their mean and softly bounded, ``c * tanh((l - mean(l)) / c)``
    with ``c =`` :data:`LOGIT_BOUND`.

    The budget fixes each mask's mean, so the logits' common level carries no information, and nothing else holds it or
    their spread: left alone they drifted in a 1,240-step run until every cell's sigmoid underflowed to 0, where
    ``hold_mean`` returns the constant budget (Beta(1, 1) at ``k = 2``) with no gradient, for good (logit differences
    down to -1,430 after step 400). Centred and bounded, every cell keeps a gradient; equal logits stay the uniform
    mask.
    """
    centred = logit - logit.mean((-2, -1), keepdim=True)
    return LOGIT_BOUND * torch.tanh(centred / LOGIT_BOUND)


class BudgetAllocation(nn.Module):
    """A mask policy read as an allocation of the budget (``budget_concentration``, module docstring).

    The two output channels before any activation, ``l`` (the head output for ``softplus``; the paper's ``a = 0.9 *
    base + 0.1 * h`` for ``exp``), give each cell's mean as a logit: ``mu = hold_mean(sigmoid(d), budget)`` with ``d
    = bounded_contrast(l_alpha - l_beta)``, and cell c is Beta(k * mu_c, k * (1 - mu_c)). Reading the logits
    directly, not the policy's concentrations, matters: ``softplus(h) + 1`` has a floor at 1, and a policy whose
    outputs both sink below it has ``alpha = beta = 1`` whatever their difference, no gradient, and never comes back
    (reading the means as ``alpha / (alpha + beta)``, a run of 600 steps did so after about 75,
    docs/budget-notes.md).
    """

    def __init__(self, policy: BetaMaskPolicy, budget: float, concentration: float) -> None:
        super().__init__()
        self.policy, self.budget, self.concentration = policy, budget, concentration

    def forward(self, images: torch.Tensor, update_base: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return keep_base(self.policy, *self.concentrations(self.policy.head_output(images), update_base))

    def concentrations(self, head: torch.Tensor, update_base: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As :meth:`BetaMaskPolicy.concentrations`: for the policy's head output ``head``, and the stepped base."""
        logits, base = self.policy.mixed(head, update_base) if self.policy.param == "exp" else (head, None)
        mu = hold_mean(torch.sigmoid(bounded_contrast(logits[:, 0] - logits[:, 1])), self.budget)
        k = self.concentration
        return (k * mu).clamp(CONC_MIN, CONC_MAX), (k * (1.0 - mu)).clamp(CONC_MIN, CONC_MAX), base


class Ahead(NamedTuple):
    """The policy's forward pass for the next batch, computed on the update thread (:meth:`Reinforce._start_forward`):
    what ``act`` would compute before sampling, except storing the base and raising on non-finite concentrations."""

    alpha: torch.Tensor
    beta: torch.Tensor
    base: torch.Tensor | None
    """The moving-average base after its step (``exp``), for ``act`` to store; None for ``softplus``."""
    finite: bool
    """Whether both concentrations are finite."""
    dist: Beta
    """The per-cell Beta of the concentrations."""
    grid: torch.Tensor | None
    """The grid drawn from it with the agent's generator (None where the concentrations are not finite)."""
    log_sum_exp: torch.Tensor | None
    """:meth:`Reinforce._log_sum_exp` of the grid, for the classifier's loss scale."""
    reference: torch.Tensor | None
    """A second grid drawn after it, for ``reward_reference="sampled"`` (:meth:`Reinforce._reference`)."""


class Reinforce(Agent):
    """REINFORCE with a Beta mask policy. See the module docstring for the estimator."""

    name = "reinforce"
    learns = True
    overlap: bool | None = None
    """Compute each policy update on a second thread while the classifier's backward pass runs (the same operations
    in the same order, so the same numbers): True, False, or None to decide at the first step (:func:`spare_core`)."""

    def __init__(self, **kwargs: Any) -> None:
        self.cfg = ReinforceConfig(**kwargs)
        self.cfg.validate()

    def bind(self, core: PretrainCore, total_steps: int) -> None:
        super().bind(core, total_steps)
        cfg = self.cfg
        self.policy = BetaMaskPolicy(core.in_channels, core.cfg.grid, cfg.param, cfg.policy_width,
                                     cfg.policy_input_size).to(core.dev.device)
        if cfg.budget_concentration and core.cfg.mask_budget is None:
            raise ValueError("budget_concentration needs an environment with a mask budget; use --algo "
                             "reinforce-budget or set --mask-budget")
        self.sampler: nn.Module = (BudgetAllocation(self.policy, core.cfg.mask_budget, cfg.budget_concentration)
                                   if cfg.budget_concentration else self.policy)
        """What maps images to the concentrations the grids are drawn from (the policy itself, or its budget
        allocation); its parameters are the policy's."""
        self.net: nn.Module = self.sampler
        if is_distributed():
            ids = [core.dev.device.index] if core.dev.cuda else None
            self.net = DistributedDataParallel(self.sampler, device_ids=ids)
        self.generator: torch.Generator | None = None
        """What the grids are drawn from in one process: the agent's own, so that a draw can be made on the update
        thread (ahead of ``act``) while the training thread's data pipeline draws from and reseeds the global one; its
        state is in the agent's checkpoints. Seeded from the run's seed. Under torch.distributed (where nothing runs
        ahead) None: every rank draws from its own global generator, which the checkpoints hold per rank."""
        if not is_distributed():
            self.generator = torch.Generator(device=core.dev.device)
            self.generator.manual_seed(sampler_seed(core.cfg.seed))
        self.lr = cfg.policy_lr if cfg.policy_lr is not None else core.cfg.lr / 10
        self.optimizer = torch.optim.SGD(self.policy.parameters(), lr=self.lr, momentum=cfg.momentum)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total_steps),
                                                                    eta_min=0.0)
        self.baseline = torch.zeros((), device=core.dev.device)
        self.baseline_ready = False
        self._pending: Future | None = None
        self._ahead: tuple[torch.Tensor, torch.Tensor, Future] | None = None
        """The next batch, the generator's state before the draw for it, and the policy's concentrations and grid for
        it being computed on the update thread (:meth:`_start_forward`)."""

    @torch.no_grad()
    def mask_distribution(self, images: torch.Tensor) -> Beta:
        """The per-cell Beta the agent draws ``images``' grids from, the policy's moving-average base left as it is."""
        alpha, beta = self.sampler(images, update_base=False)
        return cell_beta(alpha, beta)

    def act(self, images: torch.Tensor) -> Action:
        self._finish_update()
        ahead = self._take_ahead(images)
        if not self.policy.training:
            self.policy.train()
        if ahead is None:
            dist = beta_distribution(self.net, images, update_base=True, step=self.core.global_step)
            grid = sample_mask(dist, self.generator)
            log_sum_exp = self._log_sum_exp(dist, grid)
            reference = self._reference(dist)
        else:
            keep_base(self.policy, ahead.alpha, ahead.beta, ahead.base)
            if not ahead.finite:
                checked_beta(ahead.alpha, ahead.beta, self.core.global_step)  # raises, naming them and the step
            dist, grid, log_sum_exp, reference = ahead.dist, ahead.grid, ahead.log_sum_exp, ahead.reference
        self._dist, self._grid = dist, grid
        # a constant to the classifier; the policy's gradient comes from observe
        self._loss_scale = all_mean(log_sum_exp) if log_sum_exp is not None else None
        overlap = self._overlaps()
        return Action(grid=grid, loss_scale=self._loss_scale, on_reward=self._start_update if overlap else None,
                      on_next_batch=self._start_forward if overlap else None, reference_grid=reference)

    @torch.no_grad()
    def _reference(self, dist: Beta) -> torch.Tensor | None:
        """A second grid per image from the same policy, drawn after the first and independent of it, where the
        environment's reward compares with one (``reward_reference="sampled"``); None elsewhere."""
        return sample_mask(dist, self.generator) if self.core.cfg.reward_reference == "sampled" else None

    @torch.no_grad()
    def _log_sum_exp(self, dist: Beta, grid: torch.Tensor) -> torch.Tensor | None:
        """The official objective's log-sum-exp term of ``grid``, its mean over this process's batch (None without
        ``scale_classifier_loss``)."""
        return log_sum_exp_term(mask_log_prob(dist, grid)) if self.cfg.scale_classifier_loss else None

    def _overlaps(self) -> bool:
        if self.overlap is None:
            self.overlap = spare_core(self.core)
        return self.overlap and not is_distributed()  # collectives and DDP's forward stay on the main thread

    def _start_update(self, reward: torch.Tensor, ce: torch.Tensor) -> None:
        """The environment's ``on_reward``: compute this step's policy update on the update thread while the
        classifier's backward pass runs on this one (:attr:`overlap`). Its errors name the step count the step will
        have once taken, as :meth:`observe` names it."""
        if self._pending is not None:
            raise RuntimeError("a second on_reward before observe: each action's on_reward is for one environment step")
        self._handed = reward
        self._pending = on_update_thread(self._update, reward, ce, self.core.global_step + 1)

    def _start_forward(self, images: torch.Tensor) -> None:
        """The environment's ``on_next_batch``: the policy's forward pass for the next batch (the trunk's convolutions,
        the head and the concentrations, with gradient, for the next update), on the update thread after this step's
        update, so with the parameters the next ``act`` would use. The moving-average base's step is computed but not
        stored (it is state a checkpoint written before then must not yet hold): ``act`` stores it, checks the
        concentrations and uses the grid drawn here from the agent's own generator (:attr:`generator`)."""
        if self._pending is not None:  # else the update runs in observe, on this thread, and would race with it
            # the generator's state before the draw made ahead, taken here while no thread draws from it
            self._ahead = (images, self.generator.get_state(), on_update_thread(self._concentrations, images))

    def _concentrations(self, images: torch.Tensor) -> Ahead:
        alpha, beta, base = self.sampler.concentrations(self.policy.head_output(images), update_base=True)
        finite = bool(torch.isfinite(alpha).all()) and bool(torch.isfinite(beta).all())
        dist = cell_beta(alpha, beta)
        if not finite:
            return Ahead(alpha, beta, base, finite, dist, None, None, None)
        grid = sample_mask(dist, self.generator)
        return Ahead(alpha, beta, base, finite, dist, grid, self._log_sum_exp(dist, grid), self._reference(dist))

    def _take_ahead(self, images: torch.Tensor | None = None) -> Ahead | None:
        """Wait for a forward pass :meth:`_start_forward` started (it reads the parameters and the base) and forget it;
        what it gave if it was for ``images`` (the same tensor), else None, its draw undone (also if it failed)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        images_ahead, rng, future = ahead
        if images_ahead is not images:
            future.exception()  # wait; an error in a forward pass nobody uses is nobody's
            self.generator.set_state(rng)
            return None
        return future.result()

    def _finish_update(self) -> dict[str, Any] | None:
        """Wait for an update started by :meth:`_start_update`; its scalars (None when none was pending). An error
        the update raised (a non-finite reward or loss) is raised here."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def observe(self, result: StepResult) -> dict[str, float]:
        overlapped = self._pending is not None
        scalars = self._finish_update()
        if not overlapped:
            return self._update(result.reward, result.loss, self.core.global_step)
        if result.reward is not self._handed:
            raise RuntimeError("observe got other rewards than the environment handed over before its backward pass "
                               "(the update already used those); to change rewards between the step and observe, "
                               "set NOISEMASK_OVERLAP_UPDATE=0 or Reinforce.overlap = False")
        return scalars

    def _update(self, reward: torch.Tensor, ce: torch.Tensor, step: int) -> dict[str, Any]:
        """One policy step from the step's per-image ``reward`` and cross-entropy ``ce``; the scalars to log."""
        cfg, dist, grid = self.cfg, self._dist, self._grid
        reward = reward.detach().float()
        check_finite(reward, "reward", step)
        cell_logp = mask_log_prob(dist, grid)
        with torch.set_grad_enabled(cfg.entropy_coef > 0 and cfg.objective == "reinforce"):
            entropy = dist.entropy().sum((1, 2))  # without a bonus, only logged
        mean_reward = all_mean(reward.mean())
        if cfg.objective == "official":
            loss = official_loss(cell_logp, all_mean(ce.mean()))
            raw_adv = reward - mean_reward
        else:
            if not self.baseline_ready:
                self.baseline.copy_(mean_reward)
                self.baseline_ready = True
            if cfg.baseline == "batch":
                n = reward.numel() * world_size()
                adv = (reward - mean_reward) * n / max(1, n - 1)  # r_i - mean of the other n - 1 rewards
            else:
                adv = reward - self.baseline
            raw_adv = adv  # logged as it is before any normalisation
            if cfg.normalize_advantage:
                centred = adv - all_mean(adv.mean())
                adv = adv / (all_mean((centred**2).mean()).sqrt() + 1e-8)
            loss = reinforce_loss(cell_logp.sum((1, 2)), adv, entropy, cfg.entropy_coef)
            self.baseline.mul_(cfg.baseline_momentum).add_((1 - cfg.baseline_momentum) * mean_reward)
        check_finite(loss.detach(), "policy loss", step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.policy.parameters()
                                                       if p.grad is not None])
        self.optimizer.step()
        self.scheduler.step()
        alpha, beta = dist.concentration1.detach(), dist.concentration0.detach()
        raw_adv = raw_adv.detach()
        stats = torch.stack([
            loss.detach(), entropy.detach().mean() / grid[0].numel(), raw_adv.mean(),
            raw_adv.std() if raw_adv.numel() > 1 else raw_adv.new_zeros(()), grad_norm.detach().float(),
            self.baseline.float(), alpha.mean(), alpha.std(), beta.mean(), beta.std(),
        ])
        names = ["policy/loss", "policy/entropy_per_cell", "policy/advantage_mean", "policy/advantage_std",
                 "policy/grad_norm_before_clip", "policy/baseline", "policy/alpha_mean", "policy/alpha_std",
                 "policy/beta_mean", "policy/beta_std"]
        # 0-d tensors, read on the host only when the runner's logging window closes: no device sync per step.
        scalars = dict(zip(names, stats.unbind())) | {"policy/lr": self.optimizer.param_groups[0]["lr"]}
        if self._loss_scale is not None:
            scalars["train/loss_scale"] = self._loss_scale
        return scalars

    def state_dict(self) -> dict[str, Any]:
        self._finish_update()
        state = {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "baseline": self.baseline.detach().cpu(),
            "baseline_ready": self.baseline_ready,
            "config": asdict(self.cfg),
        }
        if self.generator is not None:  # before a draw made ahead: a resumed run's act makes it again
            rng = self._ahead[1] if self._ahead is not None else self.generator.get_state()
            state["sampler_rng"] = {"device": self.generator.device.type, "state": rng}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._finish_update()
        self._take_ahead()  # computed with the parameters about to be replaced: dropped
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        total = max(1, self.total_steps)
        if self.scheduler.T_max != total:
            # The run was extended (or shortened): anneal to 0 over its new length, from where it stands now,
            # rather than follow the saved cosine past its end (where it rises again).
            self.scheduler.T_max = total
            t = min(self.scheduler.last_epoch, total)
            for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = 0.5 * base_lr * (1.0 + math.cos(math.pi * t / total))
        self.baseline.copy_(state["baseline"])
        self.baseline_ready = bool(state["baseline_ready"])
        if self.generator is not None:
            self._restore_generator(state.get("sampler_rng"))

    def _restore_generator(self, saved: dict[str, Any] | None) -> None:
        """Set the grids' generator to a checkpoint's; one written by torch.distributed ranks, before the agent had its
        own, or on another kind of device (whose generator's state does not fit) reseeds it from the run's seed and
        step instead, with a warning: the run goes on, drawing other grids than an uninterrupted run."""
        if saved is not None and saved["device"] == self.generator.device.type:
            self.generator.set_state(saved["state"])
            return
        step = self.core.global_step
        why = "holds no state of it" if saved is None else f"holds a {saved['device']} generator's state"
        warnings.warn(f"the checkpoint {why} for the mask grids' generator ({self.generator.device.type}); it is "
                      f"reseeded from (seed, step {step}), so the grids differ from an uninterrupted run's",
                      stacklevel=3)
        self.generator.manual_seed(sampler_seed(self.core.cfg.seed, step))
