"""The heated-model file: a classifier alone, as tensors and plain values.

``heated.pt`` is a dict ``{"format", "arch", "num_classes", "in_channels", "image_size",
"class_names", "state_dict", "meta"}`` readable with ``torch.load(path, weights_only=True)``; it
names everything needed to rebuild the model, so fine-tuning needs no other file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from classifiers.io import load_tensors, save_tensors
from classifiers.models import build_classifier

FORMAT = "noisemask-heated-v1"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


def save_heated(path: str | Path, model: nn.Module, arch: str, num_classes: int, in_channels: int,
                image_size: int, class_names: list[str] | None = None, meta: dict[str, Any] | None = None) -> None:
    """Write the heated-model file atomically."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    save_tensors({
        "format": FORMAT, "arch": arch, "num_classes": int(num_classes), "in_channels": int(in_channels),
        "image_size": int(image_size), "class_names": list(class_names or []), "state_dict": state,
        "meta": dict(meta or {}),
    }, path)


def load_heated(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the classifier stored in a heated-model file; return it and the file's fields."""
    blob = load_tensors(path)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a heated-model file (format {FORMAT!r}); give the heated.pt a "
                         "pretraining run wrote")
    model = build_classifier(blob["arch"], blob["num_classes"], blob["in_channels"], blob["image_size"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit architecture {blob['arch']!r} with "
                         f"{blob['num_classes']} classes ({str(exc).splitlines()[0]})") from None
    info = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, info
