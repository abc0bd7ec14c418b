"""Classifiers: a small CNN for tiny images and tests, and torchvision ResNets.

For images of 64 px and below the ResNets use a CIFAR-style stem (3x3 convolution, stride 1, no
max-pool) so the last stage still sees a spatial map; larger images keep torchvision's stem.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from classifiers.data import DataError

SMALL_IMAGE = 64
ARCHITECTURES = ("smallcnn", "resnet18", "resnet34", "resnet50")


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (two strided) and a linear head: fast on a CPU."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width, 1), block(width, width * 2, 2),
            block(width * 2, width * 2, 1), block(width * 2, width * 4, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_classifier(name: str, num_classes: int, in_channels: int = 1, image_size: int = 64) -> nn.Module:
    """Build an untrained classifier.

    Args:
        name: one of ``smallcnn``, ``resnet18``, ``resnet34``, ``resnet50``.
        num_classes: size of the output layer.
        in_channels: image channels (1 for grayscale, 3 for colour).
        image_size: input side in pixels; 64 and below selects the small-image stem.
    The classification layer is always the attribute ``fc``.
    """
    if name not in ARCHITECTURES:
        raise DataError(f"unknown classifier {name!r}; use one of {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise DataError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    if in_channels < 1:
        raise DataError(f"in_channels={in_channels} must be at least 1")
    if name == "smallcnn":
        return SmallCNN(num_classes, in_channels)
    model = getattr(models, name)(weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def replace_head(model: nn.Module, num_classes: int, force: bool = False) -> bool:
    """Give ``model`` a fresh ``fc`` layer for ``num_classes`` when its class count differs (or ``force``);
    return whether it changed."""
    if model.fc.out_features == num_classes and not force:
        return False
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return True


class LinearProbe(nn.Module):
    """A classifier whose features are frozen: only its ``fc`` layer learns, and the rest stays in evaluation mode
    whatever ``train()`` says, so its BatchNorm statistics stay the pretrained ones. Reads what a representation
    holds without changing it. The classifier is the attribute ``module`` (what ``classifiers.heated.unwrap``
    returns), so saving it writes the plain classifier.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("fc."))

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.module.eval()
        self.module.fc.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
