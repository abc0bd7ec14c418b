"""Applying a trained classifier to new image files: the model file, the images, the predictions and their CSV.

A model file is a heated-model file (:mod:`classifiers.heated`): the ``heated.pt`` of a pretraining run or the
``model.pt`` of a fine-tuning run. It names the architecture, the classes, the channels and the image size, so it
alone says how to read new images: each file becomes the *stored image* a dataset of the model's channels and size
holds (``classifiers.data.stored_image``: the same decoding, channel conversion, resizing and centre crop as training
and evaluation), normalised as in training (``classifiers.train.Normalizer``). Any image is converted to the model's
channels and size; only a model for other than 1 or 3 channels cannot be given image files.

A file that cannot be read (empty, damaged, not an image) does not stop a run: its row carries the reason.
"""

from __future__ import annotations

import csv
import io
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from classifiers.data import IMAGE_SUFFIXES, ImageSource, _StoredImages, auto_workers
from classifiers.heated import load_heated
from classifiers.io import atomic_write
from classifiers.train import DevicePolicy, Normalizer, resolve_device

MODEL_FILES = "the heated.pt of a pretraining run (scripts/pretrain.py) or the model.pt of a fine-tuning run " \
              "(scripts/finetune.py)"
"""What ``--model`` takes, as error messages name it."""
SHOWN_CLASSES = 10
"""Class names an error message lists before it cuts the list short."""


@dataclass
class ModelFile:
    """A classifier read from a model file, with what its inputs must be."""

    model: nn.Module
    class_names: list[str]
    in_channels: int
    image_size: int
    """The side of the images the model was trained on (a fine-tuned model's may differ from its heated model's)."""


def load_model_file(path: str | Path) -> ModelFile:
    """Read a model file (see the module); raise ``ValueError`` or ``FileNotFoundError`` naming the problem and the
    fix for a missing file, a file that is not a model, or a model no image file can be given to."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist; give {MODEL_FILES}")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives: anything else is no model file
        raise ValueError(f"{path} is not a model file (not a PyTorch file); give {MODEL_FILES}")
    model, info = load_heated(path)
    names = list(info["class_names"]) or [str(i) for i in range(info["num_classes"])]
    if len(names) != info["num_classes"]:
        raise ValueError(f"{path} names {len(names)} classes for a model of {info['num_classes']}; the file is "
                         f"inconsistent, give {MODEL_FILES}")
    if info["in_channels"] not in (1, 3):
        raise ValueError(f"{path} takes {info['in_channels']}-channel images, and image files are read as 1 "
                         "(grayscale) or 3 (colour) channels; give a model trained on images of 1 or 3 channels")
    # A fine-tuned model keeps its heated model's image size (it chose the architecture's stem) and records the size
    # of the images it was trained on in its meta (classifiers.finetune).
    size = int(info.get("meta", {}).get("image_size", info["image_size"]))
    return ModelFile(model, names, int(info["in_channels"]), size)


def _images_in(folder: Path) -> list[Path]:
    # Not only is_file(): a broken symbolic link named like an image gets a row with its reason
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


def _no_images(folder: Path, fix: str) -> ValueError:
    return ValueError(f"folder {folder} holds no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}); {fix}")


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The image files ``paths`` name: files as given (whatever their suffix), folders searched through for files
    with an image suffix, in sorted order. A missing path or a folder without images is a ``ValueError``."""
    if not paths:
        raise ValueError("no images given; name image files or folders of images")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = _images_in(path)
            if not found:
                raise _no_images(path, "give a folder of images or the image files")
            files += found
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise ValueError(f"{path} does not exist; give image files or folders of images")
    return files


def labelled_images(folders: Sequence[str | Path], class_names: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """The images of folders laid out as ``DIR/<class>/*`` and their classes, as indices into ``class_names``.

    A class folder may be empty; one named after no class of the model, an image outside a class folder, or no image
    at all is a ``ValueError`` naming the fix."""
    index = {name: i for i, name in enumerate(class_names)}
    files: list[Path] = []
    labels: list[int] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder; with --labels give folders laid out as DIR/<class>/*")
        loose = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        if loose:
            raise ValueError(f"{loose[0]} is not in a class folder; with --labels every image is in "
                             f"{folder}/<class>/: move it there, or drop --labels")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{folder} has no class folders; with --labels the layout is {folder}/<class>/*")
        unknown = [c for c in classes if c not in index]
        if unknown:
            known = ", ".join(class_names[:SHOWN_CLASSES]) + (", ..." if len(class_names) > SHOWN_CLASSES else "")
            raise ValueError(f"class folders {', '.join(unknown)} of {folder} are not among the model's "
                             f"{len(class_names)} classes ({known}); rename or remove them")
        found = {c: _images_in(folder / c) for c in classes}
        if not any(found.values()):
            raise _no_images(folder, "put images in its class folders")
        for c, images in found.items():
            files += images
            labels += [index[c]] * len(images)
    return files, np.array(labels, dtype=np.int64)


@dataclass
class Predictions:
    """Per image file: the class probabilities (NaN where it could not be read) and '' or the reason it could not."""

    files: list[Path]
    probs: np.ndarray
    errors: list[str]

    @property
    def readable(self) -> np.ndarray:
        """Which images were read, (N,) bool."""
        return np.array([not e for e in self.errors], dtype=bool)


@torch.no_grad()
def predict_files(model_file: ModelFile, files: Sequence[Path], batch_size: int = 64, device: str = "auto"
                  ) -> Predictions:
    """Class probabilities of image files in batches, in float32, with a progress bar; see the module."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    if not files:
        raise ValueError("no images given; name image files or folders of images")
    dev = DevicePolicy(resolve_device(device), "fp32")
    model = dev.prepare(model_file.model).eval()
    normalizer = Normalizer()
    images = _StoredImages(list(files), model_file.image_size, model_file.in_channels)
    workers = auto_workers(ImageSource(labels=np.zeros(len(files), np.int64), files=list(files)))
    probs, errors = [], []
    with tqdm(total=len(files), desc=f"predict ({dev.device})", unit="image", dynamic_ncols=True) as bar:
        for batch, reasons in DataLoader(images, batch_size=batch_size, num_workers=workers):
            batch = batch.to(dev.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            p = model(normalizer(batch)).float().softmax(1).cpu().numpy().astype(np.float64)
            p[[bool(r) for r in reasons]] = math.nan
            probs.append(p)
            errors += list(reasons)
            bar.update(len(reasons))
    return Predictions(list(files), np.concatenate(probs), errors)


def write_predictions(path: str | Path, predictions: Predictions, class_names: Sequence[str],
                      labels: np.ndarray | None = None) -> None:
    """Write the predictions as CSV, atomically: one row per image with ``file``, ``true_class`` (given ``labels``),
    ``predicted_class``, ``prob_<class>`` per class and ``error`` (empty when the image was read)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["file", *(["true_class"] if labels is not None else []), "predicted_class",
                     *(f"prob_{name}" for name in class_names), "error"])
    for i, (file, p, error) in enumerate(zip(predictions.files, predictions.probs, predictions.errors)):
        truth = [class_names[labels[i]]] if labels is not None else []
        if error:
            writer.writerow([str(file), *truth, "", *[""] * len(class_names), error])
        else:
            writer.writerow([str(file), *truth, class_names[int(p.argmax())], *(f"{v:.6g}" for v in p), ""])
    try:
        atomic_write(path, lambda fh: fh.write(out.getvalue().encode()))
    except OSError as exc:
        raise ValueError(f"cannot write {path} ({exc.strerror or exc}); choose another --out") from None


def check_output(path: str | Path) -> Path:
    """Refuse an output path that cannot be written before any image is read (``ValueError`` naming the fix)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name such as {path / 'predictions.csv'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {path} cannot be written ({parent} is not writable); choose another path")
    return path
