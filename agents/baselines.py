"""Non-learned agents: plain training (also at a scaled loss), a fixed Beta(1, 1) blurred mask, additive
Gaussian noise, a mask that hides what the current classifier looks at (``saliency-mask``), and the augmentations a
practitioner would reach for instead of a learned mask (torchvision's
``RandomErasing`` and ``TrivialAugmentWide``)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from agents.base import Action, Agent
from agents.policy import cell_beta
from envs.core import PretrainCore, StepResult


class NoMask(Agent):
    """Plain training: the classifier sees the clean normalised batch (an all-ones mask, not applied)."""

    name = "none"

    def act(self, images: torch.Tensor) -> Action:
        return Action()


class ScaledNoMask(Agent):
    """Plain training with the classifier's loss multiplied by a constant ``loss_scale``: the control for the
    reference recipe's loss scaling (``reinforce-official-scaled``), which separates "mask" from "larger step".

    The default factor is ``log(G * G)``: the reference factor's exact value when every cell is Beta(1, 1),
    toward which its objective drifts (8.32 at the paper's G = 64; it measured about 8.5). With SGD, a loss
    scaled by k at learning rate l and weight decay w takes the same steps as the unscaled loss at learning
    rate k * l and weight decay w / k (the gradient is k * dCE + w * theta).
    """

    name = "none-scaled"

    def __init__(self, loss_scale: float | None = None) -> None:
        if loss_scale is not None:
            check_loss_scale(loss_scale, "set loss_scale (--loss-scale) to a positive number, e.g. 8.5")
        self.loss_scale = loss_scale

    def bind(self, core: PretrainCore, total_steps: int) -> None:
        super().bind(core, total_steps)
        g = core.cfg.grid
        factor = self.loss_scale if self.loss_scale is not None else math.log(g * g)
        check_loss_scale(factor, f"the default log(G * G) needs a grid above 1 (got {g}); set loss_scale")
        self.factor = factor
        self._scale = torch.tensor(factor, device=core.dev.device)

    def act(self, images: torch.Tensor) -> Action:
        return Action(loss_scale=self._scale)

    def observe(self, result: StepResult) -> dict[str, float]:
        return {"train/loss_scale": self.factor}


def check_loss_scale(value: float, fix: str) -> None:
    """Raise ``ValueError`` naming ``value`` and ``fix`` unless it is a positive, finite number."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"loss scale {value} must be a positive, finite number; {fix}")


class UniformMask(Agent):
    """Cells i.i.d. Beta(a, b) (default Beta(1, 1), uniform), upsampled and blurred like the learned mask.

    This is what the reference code's objective drifts toward, so it is the ablation that tells
    whether a learned policy adds anything.
    """

    name = "uniform-mask"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"Beta({alpha}, {beta}): both concentrations must be positive")
        self.alpha, self.beta = alpha, beta
        self._dist: torch.distributions.Beta | None = None

    def mask_distribution(self, images: torch.Tensor) -> torch.distributions.Beta:
        """The per-cell Beta of ``images``' grids: built once per batch size and device (it draws the same numbers as
        one built anew)."""
        g = self.core.cfg.grid
        shape = (images.shape[0], g, g)
        dist = self._dist
        if dist is None or dist.batch_shape != shape or dist.concentration1.device != images.device:
            dist = self._dist = cell_beta(torch.full(shape, self.alpha, device=images.device),
                                          torch.full(shape, self.beta, device=images.device))
        return dist

    def act(self, images: torch.Tensor) -> Action:
        if self.alpha == self.beta == 1.0:
            # Beta(1, 1) is the uniform law on (0, 1): one uniform draw per cell, not two Gamma draws (0.19 ms for the
            # demo's 32 grids of 8 x 8 on one core, against 0.007); the same law, other numbers than Beta.sample's
            g = self.core.cfg.grid
            return Action(grid=torch.rand(images.shape[0], g, g, device=images.device))
        return Action(grid=self.mask_distribution(images).sample())


class GaussianNoise(Agent):
    """Additive Gaussian noise of standard deviation ``noise_std`` on the normalised image."""

    name = "gaussian-noise"

    def __init__(self, noise_std: float = 0.5) -> None:
        if noise_std < 0:
            raise ValueError(f"noise std {noise_std} must be 0 or more")
        self.std = noise_std

    def act(self, images: torch.Tensor) -> Action:
        return Action(perturb=lambda x: x + self.std * torch.randn_like(x))


class Augmentation(Agent):
    """A torchvision augmentation drawn independently for every image of the batch (a v2 transform given a batch
    would draw one set of parameters for all of it). Subclasses build ``self.transform``."""

    transform: v2.Transform
    on_uint8 = True
    """Applied to the uint8 images before normalisation (False: to the normalised batch)."""

    def _each(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in batch])

    def act(self, images: torch.Tensor) -> Action:
        return Action(augment=self._each) if self.on_uint8 else Action(perturb=self._each)


class RandomErasing(Augmentation):
    """torchvision's ``RandomErasing`` on the normalised image (erased rectangles become 0, the dataset mean): occlusion
    without learning, the closest non-learned cousin of a noise mask.

    Args:
        erase_p: probability that an image gets a rectangle erased (torchvision's default 0.5).
        erase_scale: range of the rectangle's share of the image area (torchvision's default (0.02, 0.33)).
    """

    name = "random-erasing"
    on_uint8 = False

    def __init__(self, erase_p: float = 0.5, erase_scale: tuple[float, float] = (0.02, 0.33)) -> None:
        if not 0.0 <= erase_p <= 1.0:
            raise ValueError(f"erase_p {erase_p} must lie in [0, 1]")
        self.transform = v2.RandomErasing(p=erase_p, scale=tuple(erase_scale), value=0.0)


class TrivialAugment(Augmentation):
    """torchvision's ``TrivialAugmentWide`` on the uint8 image: one random photometric or geometric operation of random
    strength per image (Müller and Hutter, 2021), the tuning-free augmentation a practitioner reaches for."""

    name = "trivial-augment"

    def __init__(self) -> None:
        self.transform = v2.TrivialAugmentWide()


class SaliencyMask(Agent):
    """Hide what the current classifier looks at: the cells of largest input-gradient saliency get 0, the others 1, so
    the mask keeps the environment's budget (MaskTune's masking of what the trained model uses, Asgari et al. 2022,
    here at every step). The non-learned anchor that knows the model: a learned policy must beat it to earn its cost.

    Saliency is ``|d log p_c / d x|`` of the classifier's predicted class ``c`` on the clean normalised image, in eval
    mode (running statistics, nothing updated), summed over channels and averaged over each grid cell. The predicted
    class, not the label, so that the same mask serves training, evaluation and the diagnostics' probe alike.

    Args:
        budget: the share of cells kept (1); the rest, the most salient, get 0. None: the environment's mask budget.
    """

    name = "saliency-mask"

    def __init__(self, budget: float | None = None) -> None:
        if budget is not None and not 0.0 < budget < 1.0:
            raise ValueError(f"saliency-mask budget {budget} must lie strictly between 0 and 1 (the share of cells "
                             "kept); leave it unset to use the environment's mask budget")
        self.budget = budget

    def bind(self, core: PretrainCore, total_steps: int) -> None:
        super().bind(core, total_steps)
        budget = self.budget if self.budget is not None else core.cfg.mask_budget
        if budget is None:
            raise ValueError("saliency-mask needs a budget: use --algo saliency-mask as registered (mask budget 0.5) "
                             "or set --mask-budget")
        self.kept = budget

    def saliency(self, images: torch.Tensor) -> torch.Tensor:
        """Each grid cell's mean input-gradient saliency (B, G, G) of the classifier's predicted class."""
        core = self.core
        model = core.classifier
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                x = core.inputs(images).detach().requires_grad_(True)
                log_p = model(x).float().log_softmax(1)
                score = log_p.gather(1, log_p.argmax(1, keepdim=True)).sum()
                (grad,) = torch.autograd.grad(score, x)
        finally:
            model.train(was_training)
        g = core.cfg.grid
        return torch.nn.functional.adaptive_avg_pool2d(grad.abs().sum(1, keepdim=True), g)[:, 0]

    def mask_policy(self, images: torch.Tensor) -> torch.Tensor:
        """The grid :meth:`act` applies to ``images`` (deterministic, so it is its own expectation)."""
        saliency = self.saliency(images).flatten(1)
        hidden = round((1.0 - self.kept) * saliency.shape[1])
        grid = torch.ones_like(saliency)
        grid.scatter_(1, saliency.topk(hidden, dim=1).indices, 0.0)
        return grid.view(-1, self.core.cfg.grid, self.core.cfg.grid)

    def act(self, images: torch.Tensor) -> Action:
        return Action(grid=self.mask_policy(images))
