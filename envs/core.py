"""The environment core: one implementation of "a step", shared by the Gymnasium and VecEnv faces.

A step takes each image's noise-mask grid (or a perturbation of the normalised batch, for the
non-learned additive-noise baseline), applies it, takes one classifier optimiser step on the
masked batch, and moves to the next batch. Everything stays a tensor on the device; numpy appears
only in the faces.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from classifiers.data import DataSpec, load_dataset, make_loader
from classifiers.distributed import average_buffers
from classifiers.models import ARCHITECTURES, build_classifier
from classifiers.train import (
    DevicePolicy,
    Normalizer,
    check_precision,
    generalized_cross_entropy,
    resolve_device,
    supervised_step,
)
from envs.masks import MASK_OPS, NoiseMask, hold_mean, random_style

REWARDS = ("classifiable", "adversarial", "correct", "biased")
REWARD_FORWARDS = ("train", "eval")
REWARD_REFERENCES = ("none", "constant", "sampled")
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EnvConfig:
    """Everything that defines a pretraining environment."""

    dataset: str = "synthrad"
    """Dataset specification (see ``classifiers.data``)."""
    classifier: str = "smallcnn"
    """Classifier architecture: smallcnn, resnet18, resnet34 or resnet50."""
    batch_size: int = 32
    """Images per step (per process under torchrun)."""
    image_size: int = 64
    """Side of the square images in pixels."""
    grid: int = 16
    """Side G of the noise-mask grid (the paper: 64 at 224 px)."""
    blur_kernel: int = 13
    """Odd Gaussian kernel size of the mask blur (the paper: 13); 1 disables the blur."""
    blur_sigma: float = 6.0
    """Gaussian sigma of the mask blur in pixels (the paper: 6)."""
    lr: float = 0.1
    """Classifier SGD learning rate (the paper: 0.1)."""
    momentum: float = 0.9
    """Classifier SGD momentum."""
    weight_decay: float = 1e-4
    """Classifier SGD weight decay."""
    lr_step_epochs: int = 30
    """StepLR period in epochs (the paper: 30, factor 0.1)."""
    reward: str = "classifiable"
    """``classifiable``: -CE per image (the paper's sign); ``adversarial``: +CE; ``correct``: 1 when right;
    ``biased``: aimed at the shortcut, ``CE_biased - bias_weight * CE``, where ``CE_biased`` is the cross-entropy of a
    *biased* auxiliary classifier that trains alongside on the same masked batches with the generalised
    cross-entropy, so it reads the easiest cue (Learning from Failure;
    ``classifiers.train.generalized_cross_entropy``), read in eval mode on the masked image: the policy is rewarded
    for hiding what the biased model reads, less what the classifier itself loses (docs/method.md, section 8)."""
    mask_op: str = "multiply"
    """How the mask acts on the normalised image: ``multiply`` (the paper's, ``M * x``) or ``blend``
    (``M * x + (1 - M) * S(x)`` with ``S`` a random restyling per image, ``envs.masks.random_style``)."""
    bias_q: float = 0.7
    """With the ``biased`` reward: the generalised cross-entropy's ``q`` of the biased classifier (LfF: 0.7)."""
    bias_weight: float = 0.0
    """With the ``biased`` reward: the weight of the classifier's own cross-entropy, subtracted from the biased
    classifier's. 0 by default: the mask budget already leaves the classifier half of each image."""
    mask_budget: float | None = None
    """Hold each image's mean grid value at this budget in (0, 1) (``envs.masks.hold_mean``), so a policy chooses where
    the noise goes, not how much; None: grids are applied as given."""
    reward_forward: str = "train"
    """Which forward pass of the classifier the reward is read from. ``train``: the training step's own (train-mode
    BatchNorm, so each image's cross-entropy also depends on the other images' masks through the batch statistics);
    ``eval``: an extra no-grad forward in eval mode (running statistics) on the same masked batch, before the update,
    so each image's reward depends on its own mask only. The classifier trains the same way under both."""
    reward_reference: str = "none"
    """A per-image control subtracted from the reward. ``none``; ``constant``: the same image's reward under the
    constant mask at ``mask_budget`` (the image times the budget), from the same kind of forward pass as the reward
    (``reward_forward``; in train mode a second, no-grad forward on the reference batch whose BatchNorm statistics
    are thrown away), so the reward says how much *this* mask changes *this* image's cross-entropy compared with
    spreading the budget evenly. It does not depend on the sampled mask, so the policy gradient stays unbiased, and it
    takes the image's own difficulty out of the reward. Needs ``mask_budget``. ``sampled``: the same under a second
    grid the agent draws from the same policy, independently of the first (``Action.reference_grid``), so the reward
    says which of the policy's own masks does better, and the reference is always a mask of the kind the models are
    trained on (a two-sample baseline: unbiased, since the second grid does not depend on the first)."""
    max_steps: int | None = None
    """Truncate each episode after this many steps (None: one pass over the training set)."""
    seed: int = 0
    """Seeds the classifier's initialisation and the data order."""
    device: str = "auto"
    """auto, cpu or cuda."""
    precision: str = "auto"
    """The classifier's arithmetic: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 on a GPU that computes it natively
    and on a CPU with AMX, fp32 elsewhere; see ``classifiers.train.resolve_precision``). Policies stay float32."""
    workers: int | None = 0
    """DataLoader worker processes (None: chosen from the cores, ``classifiers.data.auto_workers``; the scripts'
    default)."""
    sync_bn: bool = False
    """Under torchrun on CUDA, synchronise BatchNorm statistics over all processes (SyncBatchNorm), so N
    processes of batch B normalise like one of batch N*B. Off by default: per-process statistics, as in the
    paper's 8-GPU runs (PyTorch's SyncBatchNorm has no CPU implementation)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the value and the fix for any setting that cannot work."""
        if self.classifier not in ARCHITECTURES:
            raise ValueError(f"unknown classifier {self.classifier!r}; use one of {', '.join(ARCHITECTURES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if self.image_size < 8:
            raise ValueError(f"image size {self.image_size} is too small; use 8 or more (the paper: 224)")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"learning rate {self.lr} must be a positive number (the paper uses 0.1)")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; use one of {', '.join(REWARDS)}")
        if self.mask_op not in MASK_OPS:
            raise ValueError(f"unknown mask_op {self.mask_op!r}; use one of {', '.join(MASK_OPS)}")
        if not (0.0 < self.bias_q <= 1.0):
            raise ValueError(f"bias_q {self.bias_q} must lie in (0, 1] (LfF uses 0.7; near 0 is the plain "
                             "cross-entropy)")
        if not (self.bias_weight >= 0 and math.isfinite(self.bias_weight)):
            raise ValueError(f"bias_weight {self.bias_weight} must be a finite number, 0 or more")
        if self.reward_forward not in REWARD_FORWARDS:
            raise ValueError(f"unknown reward_forward {self.reward_forward!r}; use one of {', '.join(REWARD_FORWARDS)}")
        if self.reward_reference not in REWARD_REFERENCES:
            raise ValueError(f"unknown reward_reference {self.reward_reference!r}; use one of "
                             f"{', '.join(REWARD_REFERENCES)}")
        if self.reward_reference != "none" and self.mask_budget is None:
            raise ValueError(f"reward_reference {self.reward_reference!r} (each image under a reference mask at the "
                             "budget) needs a mask_budget; set one (for example 0.5), or use reward_reference 'none'")
        if self.mask_budget is not None and not 0.0 < self.mask_budget < 1.0:
            raise ValueError(f"mask budget {self.mask_budget} must lie strictly between 0 and 1 (the mean mask value "
                             "each image keeps; 0.5 is what Beta(1, 1) masks give on average)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps {self.max_steps} must be at least 1 (or None)")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers {self.workers} must be 0 or more (or None: chosen from the cores)")
        if self.lr_step_epochs < 1:
            raise ValueError(f"lr_step_epochs {self.lr_step_epochs} must be at least 1")
        check_precision(self.precision)  # resolved later, by DevicePolicy, once the process has its GPU
        NoiseMask(self.image_size, self.grid, self.blur_kernel, self.blur_sigma)
        resolve_device(self.device)


@dataclass
class StepResult:
    """What one classifier step produced; tensors live on the device."""

    reward: torch.Tensor
    """Per-image reward, shape (B,)."""
    loss: torch.Tensor
    """Per-image cross-entropy of the masked batch (before the update), shape (B,)."""
    correct: torch.Tensor
    """Per-image correctness of that forward pass, shape (B,), float."""
    truncated: bool
    """The episode ended (its epoch ran out, or ``max_steps`` was reached)."""
    grid: torch.Tensor | None = None
    """The mask grid the step applied (B, G, G), after the budget (None: no mask)."""
    biased_loss: torch.Tensor | None = None
    """With the ``biased`` reward: the biased classifier's per-image cross-entropy on the masked batch (B,)."""
    biased_correct: torch.Tensor | None = None
    """With the ``biased`` reward: the biased classifier's per-image correctness in its own training step on the masked
    batch (B,): how well it reads the cues the masks leave."""


class PretrainCore:
    """The classifier, its optimiser and data, and the masked training step.

    Under ``torch.distributed`` (initialised by the caller) the classifier is wrapped in
    DistributedDataParallel and the data sharded by rank, so N processes with batch B take the
    same steps as one process with batch N*B.
    """

    def __init__(self, cfg: EnvConfig, data: DataSpec | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dev = DevicePolicy(resolve_device(cfg.device), cfg.precision)
        self.dev.require_same_on_all_ranks()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.data = data if data is not None else load_dataset(cfg.dataset, image_size=cfg.image_size)
        if self.data.image_size != cfg.image_size:
            raise ValueError(f"dataset {self.data.name} has {self.data.image_size} px images but image_size is "
                             f"{cfg.image_size}; load it with image_size={cfg.image_size}")
        self.loader = make_loader(self.data, "train", cfg.batch_size, train=True, seed=cfg.seed,
                                  workers=cfg.workers, pin_memory=self.dev.cuda, rank=self.rank,
                                  num_replicas=self.world_size)
        self.steps_per_epoch = len(self.loader)
        self.normalizer = Normalizer()
        self.mask = NoiseMask(cfg.image_size, cfg.grid, cfg.blur_kernel, cfg.blur_sigma).to(self.dev.device)
        self.in_channels = self.data.in_channels
        self.num_classes = self.data.num_classes
        self.global_step = 0
        self.epoch = -1
        self.step_in_epoch = 0
        self.episode_steps = 0
        self._iter = None
        self._held: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        """The batch a failed step had fetched ahead (at most one; None when the epoch had run out)."""
        self.exhausted = True
        self.images: torch.Tensor | None = None
        self.stepped_images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.biased: torch.nn.Module | None = None
        """The ``biased`` reward's auxiliary classifier (None for the other rewards)."""
        self._init_classifier(cfg.seed)

    def _build(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
        """A fresh classifier of the configured architecture: the module, what trains it (DDP under torch.distributed)
        and its SGD optimiser."""
        module = self.dev.prepare(build_classifier(self.cfg.classifier, self.num_classes, self.in_channels,
                                                   self.cfg.image_size))
        model = module
        if self.distributed:
            ids = [self.dev.device.index] if self.dev.cuda else None
            if self.cfg.sync_bn and self.dev.cuda:
                module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            model = DistributedDataParallel(module, device_ids=ids)
        optimizer = torch.optim.SGD(module.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                    weight_decay=self.cfg.weight_decay)
        return module, model, optimizer

    def _init_classifier(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.classifier, self.model, self.optimizer = self._build()
        if self.cfg.reward == "biased":
            self.biased, self.biased_model, self.biased_optimizer = self._build()
        self.loader.sampler.seed = seed
        self.global_step, self.epoch, self.step_in_epoch = 0, -1, 0

    def lr_at(self, epoch: int) -> float:
        """The classifier's step schedule: ``lr * 0.1 ** (epoch // lr_step_epochs)`` (the paper's StepLR)."""
        return self.cfg.lr * 0.1 ** (epoch // self.cfg.lr_step_epochs)

    def _start_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.step_in_epoch, self.episode_steps = epoch, start_step, 0
        for optimizer in self._optimizers():
            for group in optimizer.param_groups:
                group["lr"] = self.lr_at(epoch)
        self.loader.sampler.set_epoch(epoch, start_step * self.cfg.batch_size)
        self._iter = iter(self.loader)
        self._held = []
        self.exhausted = not self._next_batch()

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.biased_optimizer] if self.biased is not None else [])

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The epoch's next (images, labels) on the device; None when it has run out."""
        if self._held:  # fetched by a step that then failed
            return self._held.pop()
        try:
            images, labels = next(self._iter)
        except StopIteration:
            return None
        return self.dev.batch(images, labels)

    def _load(self, batch: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        """Make ``batch`` (from :meth:`_fetch`) the current one; False when the epoch had run out."""
        if batch is not None:
            self.images, self.labels = batch
        return batch is not None

    def _next_batch(self) -> bool:
        return self._load(self._fetch())

    def reset(self, seed: int | None = None) -> torch.Tensor:
        """Start an episode. With ``seed``: a fresh classifier, optimiser and data order (a new run).
        Without: the next epoch, with the classifier as it is. Returns the first uint8 batch."""
        if seed is not None:
            self._init_classifier(seed)
        self._start_epoch(self.epoch + 1)
        return self.images

    def inputs(self, images: torch.Tensor, grid: torch.Tensor | None = None, perturb: Transform | None = None,
               augment: Transform | None = None) -> torch.Tensor:
        """The classifier's input for a uint8 batch: passed through ``augment`` if given, normalised, multiplied by
        the noise mask of ``grid`` (B, G, G) if given (held at the mask budget first, if there is one:
        :meth:`applied_grid`; under ``mask_op="blend"``, blended with a restyled copy), then passed through ``perturb``
        if given. What :meth:`step` trains on."""
        grid = self.applied_grid(grid)
        clean = self._normalised(images, augment)
        return self._masked(clean, grid, perturb, self._styled(clean, grid))

    def _normalised(self, images: torch.Tensor, augment: Transform | None) -> torch.Tensor:
        return self.normalizer(augment(images) if augment is not None else images)

    def _styled(self, clean: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor | None:
        """The restyled copies a ``blend`` mask mixes in (drawn once per step, so the reward's reference sees the same
        ones); None under ``multiply`` or without a mask."""
        return random_style(clean) if grid is not None and self.cfg.mask_op == "blend" else None

    def _masked(self, x: torch.Tensor, grid: torch.Tensor | None, perturb: Transform | None,
                styled: torch.Tensor | None = None) -> torch.Tensor:
        if grid is not None:
            x = self.mask.apply(x, grid, styled)
        return perturb(x) if perturb is not None else x

    def _constant_mask(self, clean: torch.Tensor, styled: torch.Tensor | None, perturb: Transform | None
                       ) -> torch.Tensor:
        """The input under the constant mask at the budget: the constant grid gives the constant mask (the rows of the
        mask operator sum to 1), so this is the image times the budget, or blended with ``styled`` at the budget."""
        b = self.cfg.mask_budget
        x = clean * b if styled is None else torch.lerp(styled, clean, b)
        return perturb(x) if perturb is not None else x

    def applied_grid(self, grid: torch.Tensor | None) -> torch.Tensor | None:
        """``grid`` as the environment applies it: held at ``mask_budget`` when that is set, else unchanged."""
        if grid is None or self.cfg.mask_budget is None:
            return grid
        return hold_mean(grid, self.cfg.mask_budget)

    def step(self, grid: torch.Tensor | None = None, perturb: Transform | None = None,
             loss_scale: torch.Tensor | None = None, augment: Transform | None = None,
             on_reward: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
             on_next_batch: Callable[[torch.Tensor], None] | None = None,
             reference_grid: torch.Tensor | None = None) -> StepResult:
        """Augment the uint8 batch with ``augment`` if given, apply ``grid`` (B, G, G) as the noise mask (None: no
        mask) and/or ``perturb`` to the normalised batch (:meth:`inputs`), take one classifier step, and load the next
        batch. ``reference_grid`` (B, G, G) is the second grid ``reward_reference="sampled"`` compares with.

        ``loss_scale`` (a 0-d tensor on the device; None: 1) multiplies the classifier's batch-mean
        cross-entropy before its backward pass, as the reference code does; the returned losses and
        rewards stay unscaled.

        ``on_reward``, if given, is called with the per-image reward and cross-entropy (the result's ``reward`` and
        ``loss``) as soon as they are known: before the classifier's backward pass, so an agent can compute its own
        update while the classifier's step runs (:class:`agents.reinforce.Reinforce` on a spare CPU core).
        ``on_next_batch``, if given, is then called with the next uint8 batch (what :attr:`images` will be), still
        before the backward pass; not when the epoch has run out. The next batch is then loaded before the classifier's
        training forward pass rather than after its SGD step, so that loading (much of it Python) does not compete for
        the interpreter with the agent's work on its own thread; the data pipeline draws from its own generators, so the
        order changes no result, and a step that fails keeps the batch for the next. (Without ``on_next_batch`` it is
        loaded after the step, while a GPU still works through it.)"""
        if self._iter is None:
            raise RuntimeError("call reset() before step()")
        grid = self.applied_grid(grid)
        clean = self._normalised(self.images, augment)  # once: a random augmentation must be the same in both passes
        styled = self._styled(clean, grid)
        x = self._masked(clean, grid, perturb, styled)
        ref = None
        if self.cfg.reward_reference == "constant":
            ref = self._constant_mask(clean, styled, perturb)
        elif self.cfg.reward_reference == "sampled":
            if reference_grid is None:
                raise ValueError("reward_reference 'sampled' compares each mask with a second one from the same "
                                 "policy, and the agent gave none (Action.reference_grid); use a REINFORCE agent "
                                 "(reinforce-lff), or reward_reference 'constant'")
            ref = self._masked(clean, self.applied_grid(reference_grid), perturb, styled)
        b = x.shape[0]
        own = ref_score = None
        biased = biased_ref = None
        if self.biased is not None:  # what the biased classifier reads, in eval mode, before either model's update
            loss_b, _ = self._score(x if ref is None else torch.cat([x, ref]), train=False, model=self.biased)
            biased, biased_ref = loss_b[:b], (loss_b[b:] if ref is not None else None)
        if self.cfg.reward_forward == "eval":  # one forward for both, before the update
            loss_e, correct_e = self._score(x if ref is None else torch.cat([x, ref]), train=False)
            own = (loss_e[:b], correct_e[:b])
            ref_score = (loss_e[b:], correct_e[b:]) if ref is not None else None
        elif ref is not None:  # the reference in train mode, with its own batch statistics, before the update
            ref_score = self._score(ref, train=True)
        found: dict[str, torch.Tensor] = {}
        early = on_next_batch is not None
        upcoming = self._fetch() if early else None

        def forward_done(loss: torch.Tensor, logits: torch.Tensor) -> None:
            found["loss"], found["correct"] = loss, (logits.argmax(1) == self.labels).float()
            reward = self._reward(*(own if own is not None else (found["loss"], found["correct"])), biased)
            found["reward"] = reward - self._reward(*ref_score, biased_ref) if ref_score is not None else reward
            if on_reward is not None:
                on_reward(found["reward"], found["loss"])
            if early and upcoming is not None:
                on_next_batch(upcoming[0])

        try:
            supervised_step(self.model, self.optimizer, x, self.labels, self.dev, step=self.global_step,
                            loss_scale=loss_scale, after_forward=forward_done)
        except BaseException:
            if early:
                self._held.append(upcoming)
            raise
        loss, correct, reward = found["loss"], found["correct"], found["reward"]
        biased_correct = None
        if self.biased is not None:
            q = self.cfg.bias_q
            _, logits_b = supervised_step(self.biased_model, self.biased_optimizer, x, self.labels, self.dev,
                                          step=self.global_step,
                                          criterion=lambda z, y: generalized_cross_entropy(z, y, q))
            biased_correct = (logits_b.argmax(1) == self.labels).float()
        self.global_step += 1
        self.step_in_epoch += 1
        self.episode_steps += 1
        self.stepped_images = self.images  # what this step trained on, for logging beside its masks
        more = self._load(upcoming) if early else self._next_batch()
        self.exhausted = not more
        limit = self.cfg.max_steps is not None and self.episode_steps >= self.cfg.max_steps
        return StepResult(reward=reward, loss=loss, correct=correct, truncated=(not more) or limit, grid=grid,
                          biased_loss=biased, biased_correct=biased_correct)

    def _reward(self, loss: torch.Tensor, correct: torch.Tensor, biased: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image reward of ``cfg.reward`` from per-image cross-entropies and correctness, and for the ``biased``
        reward the biased classifier's cross-entropies."""
        if self.cfg.reward == "biased":
            return biased - self.cfg.bias_weight * loss
        return {"classifiable": -loss, "adversarial": loss, "correct": correct}[self.cfg.reward]

    @torch.no_grad()
    def _score(self, x: torch.Tensor, train: bool, model: torch.nn.Module | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image cross-entropy and correctness of the classifier (or ``model``) on ``x``, without gradient and
        without a trace: in eval mode (running statistics), or in train mode (the batch's own statistics) with the
        BatchNorm running statistics restored afterwards, so the training step that follows is the one it would be
        without it."""
        model = model if model is not None else self.classifier
        was_training = model.training
        saved = [b.clone() for b in model.buffers()] if train else []
        model.train(train)
        try:
            with self.dev.autocast():
                logits = model(x).float()
        finally:
            model.train(was_training)
            for b, v in zip(model.buffers(), saved):
                b.copy_(v)
        labels = self.labels.repeat(x.shape[0] // self.labels.shape[0])
        return F.cross_entropy(logits, labels, reduction="none"), (logits.argmax(1) == labels).float()

    def sync_buffers(self) -> None:
        """Make every process hold the same classifiers: average their BatchNorm statistics over ranks."""
        average_buffers(self.classifier)
        if self.biased is not None:
            average_buffers(self.biased)

    def state_dict(self) -> dict:
        """Classifier (and the biased one), optimisers, scheduler and position: enough to continue exactly."""
        state = {
            "classifier": self.classifier.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "data_seed": self.loader.sampler.seed,
            "config": asdict(self.cfg),
        }
        if self.biased is not None:
            state |= {"biased": self.biased.state_dict(), "biased_optimizer": self.biased_optimizer.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the next batch is the one the saved run would have seen next."""
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.biased is not None:
            self.biased.load_state_dict(state["biased"])
            self.biased_optimizer.load_state_dict(state["biased_optimizer"])
        self.loader.sampler.seed = state["data_seed"]
        self.global_step = state["global_step"]
        self._start_epoch(state["epoch"], state["step_in_epoch"])
