"""Plain supervised learning: device placement, normalisation, one training step, evaluation."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from classifiers.distributed import require_same
from classifiers.metrics import classification_metrics

PAPER_MEAN = 0.3162
PAPER_STD = 0.3213


MALLOC_MMAP_THRESHOLD = 32 << 20
"""Blocks below this many bytes come from malloc's heap, not a fresh ``mmap`` (glibc's largest setting)."""
MALLOC_TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap is kept up to this many bytes instead of going back to the OS."""
_allocator_tuned = False


def leave_malloc_alone(env: Mapping[str, str]) -> bool:
    """Whether the environment ``env`` turns the malloc tuning off or already tunes or replaces malloc."""
    return (env.get("NOISEMASK_TUNE_MALLOC", "1") == "0" or any(k.startswith("MALLOC_") for k in env)
            or "malloc" in env.get("GLIBC_TUNABLES", "") or "malloc" in env.get("LD_PRELOAD", ""))


def tune_cpu_allocator() -> bool:
    """Stop glibc's malloc from handing tensor buffers back to the OS after every step; True when in effect.

    By default glibc serves large blocks with ``mmap`` and trims the heap on free, so every training step
    maps its activations afresh and the kernel zeroes each page on first touch: about 13,000 page faults
    and 15 ms of a 95 ms step for smallcnn at 64 px, batch 32, on a 2-core CPU (benchmarks/RESULTS.md).
    With the thresholds raised, freed blocks are reused (the cure PyTorch's CPU tuning guide gets from
    jemalloc or tcmalloc, here without preloading a library). Linux with glibc only; idempotent. Left
    alone when ``NOISEMASK_TUNE_MALLOC=0``, when ``MALLOC_*`` variables or ``GLIBC_TUNABLES`` already tune
    malloc, or when ``LD_PRELOAD`` brings another allocator.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if leave_malloc_alone(os.environ):
        return False
    if platform.libc_ver()[0] != "glibc":  # other C libraries have their own mallopt, or none
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    _allocator_tuned = (libc.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) == 1
                        and libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD) == 1)
    return _allocator_tuned


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error naming the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


PRECISIONS = ("auto", "bf16", "fp32")
"""How the classifier trains: ``bf16`` autocast (bfloat16 matrix products and convolutions, float32 weights,
optimiser and loss) or plain ``fp32``; ``auto`` picks bf16 where the hardware multiplies bf16 natively. A run
records the resolved value in its ``config.json``, so resuming it, anywhere, keeps its arithmetic; evaluation is
always float32 (:func:`predict`)."""


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX), where bf16 autocast pays off.

    On a 2-core AMX Xeon, forward+backward+SGD of smallcnn at 64 px, batch 32, takes 37 ms in bf16 against
    74 ms in fp32, resnet18 484 against 1461 ms (benchmarks/RESULTS.md, "What changed"). Without AMX, bf16
    convolutions run on AVX-512 or are emulated; not measured to be faster, so ``auto`` keeps fp32 there."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # PyTorch's own check (its compiler uses it)
    return bool(probe is not None and probe())


def check_precision(name: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``name`` is one of :data:`PRECISIONS`."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")


def with_saved_precision(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved configuration (with a ``device`` setting) with its ``precision``; one saved before the setting existed
    gets the arithmetic that code used: bf16 autocast on CUDA, fp32 on a CPU (a saved ``auto`` device is read as
    this machine reads it, as that code would have on resuming here)."""
    if "precision" in saved:
        return dict(saved)
    device = saved.get("device", "auto")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return {**saved, "precision": "bf16" if cuda else "fp32"}


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a GPU that computes bf16 natively and on a CPU with AMX, else ``fp32``.

    An unknown name is a ``ValueError`` naming the choices."""
    check_precision(name)
    if name != "auto":
        return name
    if device.type == "cuda":
        asked = torch.cuda.device(device.index) if device.index is not None else contextlib.nullcontext()
        with asked:  # cuda:N answers for GPU N, not for the current one
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_bf16_matrix_units() else "fp32"


@dataclass
class DevicePolicy:
    """How tensors and models live on a device: channels-last everywhere, and the classifier's precision.

    Channels-last is faster on a CPU as well (oneDNN's convolutions): forward+backward of resnet18 at 64 px,
    batch 32, on 2 cores takes 1625 ms instead of 2045 ms (benchmarks/RESULTS.md). ``precision`` (see
    :data:`PRECISIONS`) is resolved once, at construction: :meth:`autocast` runs the classifier's forward
    pass in bf16 when it is ``bf16``. Mask policies stay in float32 on every device. On a CPU, constructing
    a ``DevicePolicy`` also tunes malloc (:func:`tune_cpu_allocator`)."""

    device: torch.device
    precision: str = "auto"

    def __post_init__(self) -> None:
        self.precision = resolve_precision(self.precision, self.device)
        if not self.cuda:
            tune_cpu_allocator()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def require_same_on_all_ranks(self) -> None:
        """Under torch.distributed, refuse ranks that resolved ``auto`` to different precisions (a collective: every
        rank calls it); one process: nothing to check."""
        require_same(self.precision, "precisions", "give --precision bf16 or fp32 explicitly")

    def autocast(self):
        """The context the classifier's forward pass runs in: bf16 autocast, or nothing for fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device).to(memory_format=torch.channels_last)

    def batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a uint8 batch to the device once, without blocking the host."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)


class Normalizer(nn.Module):
    """uint8 images -> float, ``(x / 255 - mean) / std`` (the paper's mean 0.3162, std 0.3213)."""

    def __init__(self, mean: float = PAPER_MEAN, std: float = PAPER_STD) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


class NonFiniteError(FloatingPointError):
    """A NaN or infinity appeared; the message names the value and the step. Nothing was updated with it."""


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    """Raise :class:`NonFiniteError` when ``value`` holds NaN or infinity."""
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(f"{what} is not finite at step {step} (value {value.flatten()[:4].tolist()}); "
                             "the step was not applied. Lower the learning rate or check the inputs")


def generalized_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """Per-image generalised cross-entropy ``(1 - p_y ** q) / q`` (Zhang and Sabuncu 2018), of shape (B,).

    Its gradient is the cross-entropy's times ``p_y ** q``: images the model already finds easy weigh more, so a model
    trained with it latches onto the easiest cue, a shortcut, the *biased* model of Learning from Failure (Nam et al.
    2020). ``q -> 0`` gives the cross-entropy."""
    log_p = F.log_softmax(logits.float(), 1).gather(1, labels[:, None])[:, 0]
    return (1.0 - torch.exp(q * log_p)) / q


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                    labels: torch.Tensor, dev: DevicePolicy, step: int = 0,
                    loss_scale: torch.Tensor | None = None,
                    after_forward: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on float inputs; returns per-image cross-entropy (or ``criterion``'s per-image loss, given one:
    ``(logits, labels) -> (B,)``) and logits, both detached, in float32.

    ``after_forward``, if given, is called with those two (detached) once the loss is known to be finite and before
    the backward pass, so a caller can start work that needs only the forward's results while the step completes.

    ``loss_scale`` (a 0-d tensor; None: 1) multiplies the batch-mean cross-entropy before the backward pass,
    as the reference code's objective does; it is a constant here (detached), and the returned losses are
    unscaled. With plain SGD it acts as a larger learning rate (weight decay, applied by the optimiser, is
    not scaled). A non-finite loss or scale raises :class:`NonFiniteError` before the weights change; buffers
    the forward pass updated (BatchNorm running statistics) are restored, so nothing keeps a trace of the bad
    batch."""
    model.train()
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    with dev.autocast():
        logits = model(inputs)
    per_image = (F.cross_entropy(logits.float(), labels, reduction="none") if criterion is None
                 else criterion(logits.float(), labels))
    loss = per_image.mean()
    if loss_scale is not None:
        loss_scale = loss_scale.detach().to(loss.dtype)
    try:
        if loss_scale is None:
            check_finite(loss, "classifier loss", step)
        else:  # one check (one device sync) for both; the message shows [loss, scale]
            check_finite(torch.stack((loss, loss_scale)), "classifier loss and its loss scale", step)
    except NonFiniteError:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        raise
    per_image, logits_out = per_image.detach(), logits.detach().float()
    if after_forward is not None:
        after_forward(per_image, logits_out)
    optimizer.zero_grad(set_to_none=True)
    (loss if loss_scale is None else loss * loss_scale).backward()
    optimizer.step()
    return per_image, logits_out


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, dev: DevicePolicy, normalizer: Callable[[torch.Tensor], torch.Tensor]
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Class probabilities and labels over a loader, and the mean cross-entropy.

    ``normalizer`` turns each uint8 batch on the device into the model's input: a :class:`Normalizer` for clean
    images, or a function that also perturbs them (a heated model evaluated on inputs like its training inputs).

    Always in float32, whatever ``dev.precision`` the model trains in: reported metrics then depend on the
    weights, not on the hardware (bf16 logits keep 8 significant bits, so near classes can tie and the
    probabilities behind ROC AUC coarsen). Evaluation is a forward pass per epoch, a small share of a run."""
    was_training = model.training
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    for images, y in loader:
        images, y = dev.batch(images, y)
        logits = model(normalizer(images)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        probs.append(logits.softmax(1).cpu())
        labels.append(y.cpu())
    model.train(was_training)
    p, lab = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return p, lab, loss_sum / max(1, len(lab))


def evaluate(model: nn.Module, loader: DataLoader, dev: DevicePolicy,
             normalizer: Callable[[torch.Tensor], torch.Tensor], agreement: dict[str, np.ndarray] | None = None
             ) -> dict[str, object]:
    """The paper's metrics plus ``loss`` over a loader (see :func:`predict`), and the shortcut metrics when
    ``agreement`` says, per shortcut and per image in the loader's order, whether its cue agrees with its class
    (``classifiers.data.DataSpec.shortcut_agreement``)."""
    probs, labels, loss = predict(model, loader, dev, normalizer)
    return {"loss": loss, **classification_metrics(labels, probs, agreement)}
