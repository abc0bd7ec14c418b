"""Datasets and loaders: every loader hands out ``uint8`` batches (B, C, H, W) and int64 labels.

Dataset specifications (``--dataset``):

- ``synthrad`` / ``synthrad:pretrain``, ``synthrad:unseen``, ``synthrad:shifted``: the embedded generator
  (``shifted`` is the pretraining task tested on images whose modality is independent of the class). Options after
  ``?`` as ``key=value`` pairs joined by ``&`` (``synthrad:unseen?n_train=600&seed=3``) set any
  :class:`~classifiers.synthrad.SynthRadConfig` field but the image size (``synthrad?shortcut=marker&marker_bias=0.9``:
  a local marker shortcut instead of the modality's).
- ``imagefolder:PATH``: RadImageNet's layout, ``PATH/train/<class>/*``, ``PATH/val/<class>/*`` and
  optionally ``PATH/test/<class>/*``; any image Pillow reads, grayscale or colour.
- ``medmnist:PATH.npz``: MedMNIST's arrays ``train_images``, ``train_labels``, ``val_*``, ``test_*``.

Image files. torchvision.io (libjpeg-turbo, libpng) decodes JPEG and PNG files; Pillow the other formats (TIFF,
BMP, GIF, WebP, PPM) and what torchvision.io would read differently (CMYK JPEG, 16-bit colour PNG); both give the
same pixels where both read a file. A dataset has one channel count: ``channels``, else the first training image's
(grayscale, 1-bit, palette and 16-bit images count as 1, others as 3). Every file is converted to it as Pillow's
``convert`` does (alpha dropped, colour to grayscale by ITU-R 601-2 luma), 16-bit and float images stretched from
their own minimum to maximum, then resized, its shorter side to the image size, and centre-cropped to a square:
the *stored image*, what evaluation sees and what training augments. Stored images are cached on disk
(:mod:`classifiers.imagecache`), so each file is decoded once, not once per epoch; building the cache is also
the check that every file can be read. Without the cache a file is checked when it is first read. Empty,
damaged and unrecognised files, broken or looping symbolic links and the files Pillow flags as possible
decompression bombs (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels) are refused with a :class:`DataError` that
names the file.

Augmentation (training only) is torchvision's RandomResizedCrop and RandomHorizontalFlip on the uint8 stored
image. Each sample's augmentation is seeded from (seed, epoch, index), so a run is reproducible whatever the
number of workers, with or without the image cache, and a resumed run sees exactly the batches it would have
seen.
"""

from __future__ import annotations

import io
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image  # deprecated since 0.29 for TorchCodec, not yet removed
from torchvision.transforms import v2

from classifiers.imagecache import CachedImages, open_or_build
from classifiers.synthrad import SynthRadConfig, class_names, load_synthrad, preferred_modality

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
SYNTHRAD_SPLITS = ("train", "val", "test", "shifted")
"""The splits synthrad generates; ``shifted`` (the pretraining task's only) tests on modalities independent of the
class. ``synthrad:shifted`` makes it the test split."""
CROP_SCALE = (0.6, 1.0)
"""RandomResizedCrop's area range; narrower than torchvision's default so small lesions survive."""
GRAY_MODES = ("L", "1", "P", "LA")
"""Pillow modes read as grayscale unless colour is asked for (besides the 16-bit and float modes ``I*``, ``F*``)."""
TORCHVISION_MODES = {
    "JPEG": {"L", "RGB"},
    "PNG": {"1", "L", "LA", "RGB", "RGBA", "P", "I", "I;16", "I;16B"},
}
"""The formats and Pillow modes torchvision.io decodes to the pixels Pillow gives; others are read by Pillow."""
MAX_WORKERS = 8
"""The most DataLoader workers chosen automatically for training and evaluation."""
MIN_CORES_FOR_WORKERS = 4
"""Fewer cores per process than this: images are decoded in the process itself (see :func:`auto_workers`)."""
BUILD_BATCH = 64
"""Images a worker decodes per batch while the image cache is built."""


class DataError(ValueError):
    """The data given cannot be used; the message names the problem and the fix."""

    def __init__(self, message: str) -> None:
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            # A DataLoader re-raises a worker's error with the worker's traceback; its last line is the message
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        super().__init__(message)


@dataclass
class ImageSource:
    """Where images come from: either in-memory uint8 arrays or a list of files."""

    labels: np.ndarray
    images: torch.Tensor | None = None
    files: list[Path] = field(default_factory=list)
    modality: np.ndarray | None = None
    """Each image's modality index, where the data knows it (synthrad)."""
    regions: torch.Tensor | None = None
    """Each image's region map (N, H, W) uint8: 0 background, 1 anatomy, 2 lesion, 3 marker, where the data knows
    it."""
    marker: np.ndarray | None = None
    """The class each image's marker spells, where the data draws one (synthrad's marker shortcut)."""
    cached: CachedImages | None = None
    """The files' stored images in the image cache, when it holds them (:mod:`classifiers.imagecache`)."""

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataSpec:
    """A loaded dataset: its splits and what a model needs to know about it."""

    name: str
    class_names: list[str]
    in_channels: int
    image_size: int
    splits: dict[str, ImageSource]
    preferred_modality: np.ndarray | None = None
    """Each class's preferred modality index, where the data knows it (synthrad): what the shortcut metrics need."""
    shortcuts: tuple[str, ...] = ()
    """The cues the data ties to the class, where it knows them (synthrad: ``modality``, ``marker`` or both)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def shortcut_agreement(self, split: str) -> dict[str, np.ndarray] | None:
        """Per shortcut of :attr:`shortcuts`, per image of ``split``: whether the cue agrees with the image's class
        (``modality``: it is shown in its class's preferred modality; ``marker``: its marker spells its class). None
        where the data knows no shortcut. What ``classifiers.metrics.shortcut_metrics`` reads."""
        source = self.splits[split]
        out = {}
        if "modality" in self.shortcuts and self.preferred_modality is not None and source.modality is not None:
            out["modality"] = source.modality == self.preferred_modality[source.labels]
        if "marker" in self.shortcuts and source.marker is not None:
            out["marker"] = source.marker == source.labels
        return out or None

    @property
    def eval_split(self) -> str:
        """The split metrics are reported on: ``test`` when there is one, else ``val``."""
        return "test" if "test" in self.splits else "val"


def _to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert uint8 (..., C, H, W) images to ``channels`` channels (grayscale <-> RGB)."""
    c = img.shape[-3]
    if c == channels:
        return img
    if channels == 1:
        return v2.functional.rgb_to_grayscale(img[..., :3, :, :], num_output_channels=1)
    if c == 1:
        return img.expand(*img.shape[:-3], channels, *img.shape[-2:]).contiguous()
    raise DataError(f"cannot convert {c}-channel images to {channels} channels; use 1 or 3")


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (C, H, W) so its shorter side is ``size`` and centre-crop it to ``size`` x ``size``."""
    if img.shape[-2:] == (size, size):
        return img
    return v2.functional.center_crop(v2.functional.resize(img, [size], antialias=True), [size, size])


def _resize_all(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [v2.functional.resize(images[i : i + 4096], [size, size], antialias=True)
           for i in range(0, len(images), 4096)]
    return torch.cat(out)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{where}: labels have shape {labels.shape}; one integer class per image is needed "
                        "(multi-label data is not supported)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {labels.dtype}; integer class indices are needed")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(f"{where}: label {bad} is out of range for {num_classes} classes (0..{num_classes - 1}); "
                        "fix the labels or the class count")
    return labels.astype(np.int64)


def _parse_options(text: str, where: str) -> dict[str, object]:
    allowed = {f.name for f in fields(SynthRadConfig)}
    opts: dict[str, object] = {}
    for key, value in parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text)):
        if key not in allowed or key in ("task", "image_size"):
            raise DataError(f"{where}: unknown option {key!r}; use any of "
                            f"{sorted(k for k in allowed if k not in ('task', 'image_size'))}")
        if key == "shortcut":
            opts[key] = value
            continue
        try:
            opts[key] = float(value) if key in ("modality_bias", "marker_bias") else int(value)
        except ValueError:
            raise DataError(f"{where}: option {key}={value!r} is not a number") from None
    return opts


def _load_synthrad(spec: str, image_size: int | None) -> DataSpec:
    rest = spec[len("synthrad"):]
    rest, _, query = rest.partition("?")
    name = rest.lstrip(":") or "pretrain"
    shifted = name == "shifted"
    task = "pretrain" if shifted else name
    try:
        cfg = SynthRadConfig(task=task, image_size=image_size or 64, **_parse_options(query, spec))
        cfg.validate()
    except ValueError as exc:
        raise DataError(f"dataset {spec!r}: {exc}; the tasks are pretrain, unseen and shifted") from None
    arrays = load_synthrad(cfg)
    splits = {s: ImageSource(labels=arrays[f"{s}_labels"], images=torch.from_numpy(arrays[f"{s}_images"]),
                             modality=arrays[f"{s}_modality"], regions=torch.from_numpy(arrays[f"{s}_regions"]),
                             marker=arrays.get(f"{s}_marker"))
              for s in SYNTHRAD_SPLITS if f"{s}_labels" in arrays}
    if shifted:
        splits["test"] = splits.pop("shifted")
    preferred = preferred_modality(task, np.arange(len(class_names(task))))
    return DataSpec(f"synthrad:{name}", class_names(task), 1, cfg.image_size, splits, preferred, cfg.shortcuts())


def _load_medmnist(spec: str, image_size: int | None) -> DataSpec:
    path = Path(spec[len("medmnist:"):]).expanduser()
    if not path.is_file():
        raise DataError(f"dataset {spec!r}: file {path} does not exist; give the path of a MedMNIST .npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"dataset {spec!r}: {path} is not a readable .npz file ({exc}); "
                        "re-download or re-create it") from None
    needed = ["train_images", "train_labels", "val_images", "val_labels"]
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise DataError(f"dataset {spec!r}: {path} lacks the arrays {missing} (it has {sorted(arrays)}); "
                        "a MedMNIST file holds train_images, train_labels, val_images, val_labels "
                        "and optionally test_images, test_labels")
    train_labels = np.asarray(arrays["train_labels"])
    if not np.issubdtype(train_labels.dtype, np.integer) or train_labels.size == 0:
        raise DataError(f"dataset {spec!r}: train_labels must be a non-empty integer array "
                        f"(got dtype {train_labels.dtype}, size {train_labels.size})")
    num_classes = int(train_labels.max()) + 1
    splits: dict[str, ImageSource] = {}
    for split in ("train", "val", "test"):
        if f"{split}_images" not in arrays:
            continue
        imgs = np.asarray(arrays[f"{split}_images"])
        if imgs.dtype != np.uint8 or imgs.ndim not in (3, 4):
            raise DataError(f"dataset {spec!r}: {split}_images has dtype {imgs.dtype} and shape {imgs.shape}; "
                            "uint8 (N, H, W) or (N, H, W, C) is needed")
        t = torch.from_numpy(imgs)
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()
        labels = _check_labels(arrays[f"{split}_labels"], num_classes, f"dataset {spec!r} ({split}_labels)")
        if len(labels) != len(t):
            raise DataError(f"dataset {spec!r}: {split}_images has {len(t)} images but {split}_labels has "
                            f"{len(labels)} labels; they must match")
        splits[split] = ImageSource(labels=labels, images=t)
    channels = splits["train"].images.shape[1]
    size = image_size or splits["train"].images.shape[-1]
    for s in splits.values():
        s.images = _resize_all(s.images, size)
    return DataSpec(f"medmnist:{path.name}", [str(i) for i in range(num_classes)], channels, size, splits)


def _load_imagefolder(spec: str, image_size: int | None, channels: int | None, cache: bool,
                      cache_train: bool = True) -> DataSpec:
    root = Path(spec[len("imagefolder:"):]).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset {spec!r}: folder {root} does not exist; give a folder holding train/ and val/")
    for needed in ("train", "val"):
        if not (root / needed).is_dir():
            raise DataError(f"dataset {spec!r}: {root / needed} is missing; the layout is "
                            "PATH/train/<class>/*, PATH/val/<class>/* and optionally PATH/test/<class>/*")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"dataset {spec!r}: {root / 'train'} has no class folders; put each class's images "
                        "in its own sub-folder, PATH/train/<class>/")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, ImageSource] = {}
    for split in ("train", "val", "test"):
        folder = root / split
        if not folder.is_dir():
            continue
        files, labels = [], []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if sub.name not in index:
                raise DataError(f"dataset {spec!r}: class folder {sub} has no counterpart in {root / 'train'}; "
                                "every class must appear in train/")
            # Not only is_file(): a broken or looping symbolic link named like an image is refused when read
            imgs = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            if not imgs:
                raise DataError(f"dataset {spec!r}: class folder {sub} holds no images "
                                f"(suffixes {sorted(IMAGE_SUFFIXES)}); add images or remove the folder")
            files += imgs
            labels += [index[sub.name]] * len(imgs)
        if not files:
            raise DataError(f"dataset {spec!r}: {folder} has no class folders with images")
        splits[split] = ImageSource(labels=np.array(labels, dtype=np.int64), files=files)
    first = splits["train"].files[0]
    with _open_image(first, _read_bytes(first)) as im:
        own_channels, (width, height) = _mode_channels(im.mode), im.size
    if image_size is None and min(width, height) < 8:
        raise DataError(f"dataset {spec!r}: the first training image {first} is {width} x {height} px, too small to "
                        "set the image size; give the image size (--image-size 8 or more)")
    data = DataSpec(f"imagefolder:{root.name}", classes, channels or own_channels, image_size or min(width, height),
                    splits)
    if cache:
        for split, source in splits.items():
            if split == "train" and not cache_train:
                continue
            source.cached = _cache_split(source.files, data, f"{root.name} {split}", f"{root.resolve() / split}")
    return data


def _stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit or float images (CT, MR) to uint8 by stretching the image's own range to 0..255.

    Pillow's ``convert("L")`` clips such images instead of rescaling them (a 16-bit CT becomes almost all
    white), so they are windowed here per image, from their minimum to their maximum."""
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _unreadable(path: Path, exc: BaseException | str) -> DataError:
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return DataError(f"cannot read image {path} ({reason}); replace or remove the file")


def _read_bytes(path: Path) -> bytearray:
    try:
        data = bytearray(path.read_bytes())  # writable, as torch.frombuffer wants
    except OSError as exc:  # a looping or dangling symbolic link, a folder named like an image, no permission
        raise _unreadable(path, f"{type(exc).__name__}: {exc.strerror or exc}") from None
    if not data:
        raise _unreadable(path, "the file is empty, 0 bytes")
    return data


def _open_image(path: Path, data: bytearray) -> Image.Image:
    """Pillow's view of ``data`` (header only); decompression bombs and unrecognised files are refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _unreadable(path, "not an image format Pillow or torchvision.io reads") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _unreadable(path, f"a possible decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises many types for damaged headers
        raise _unreadable(path, exc) from None


def _mode_channels(mode: str) -> int:
    """The channel count a Pillow mode is read as when the caller does not ask for one."""
    return 1 if mode in GRAY_MODES or mode.startswith(("I", "F")) else 3


def _to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) to (1, H, W) by Pillow's ``convert("L")`` (ITU-R 601-2 luma in 16-bit fixed point), so a file
    reads the same through torchvision.io as through Pillow; torchvision.io's images are (H, W, 3) in memory."""
    gray = Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L")
    return torch.from_numpy(np.array(gray)).unsqueeze(0)


def _decoded_to_channels(img: torch.Tensor, channels: int) -> torch.Tensor | None:
    """torchvision.io's (C, H, W) image as ``channels`` uint8 channels, as Pillow would read the file; None for what
    Pillow reads differently (16-bit colour)."""
    if img.dtype != torch.uint8:
        if img.shape[0] != 1:
            return None
        gray = torch.from_numpy(_stretch_to_uint8(img[0].numpy().astype(np.float64))).unsqueeze(0)
        return gray.expand(channels, -1, -1).contiguous()
    if img.shape[0] in (2, 4):  # alpha
        img = img[:-1]
    if img.shape[0] == channels:
        return img
    return _to_gray(img) if channels == 1 else img.expand(3, -1, -1).contiguous()


def _read_image(path: Path, channels: int | None) -> torch.Tensor:
    """Read one image file as uint8 (C, H, W); grayscale stays 1 channel unless ``channels`` says otherwise.

    torchvision.io decodes the JPEG and PNG files of :data:`TORCHVISION_MODES`; Pillow everything else, and what
    torchvision.io fails on (so the error names Pillow's reason). See the module docstring.
    """
    data = _read_bytes(path)
    with _open_image(path, data) as im:
        channels = channels or _mode_channels(im.mode)
        if im.mode in TORCHVISION_MODES.get(im.format, ()):
            mode = ImageReadMode.RGB if im.mode == "P" else ImageReadMode.UNCHANGED  # palette: its colours
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
                    img = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=mode)
                img = _decoded_to_channels(img, channels)
            except RuntimeError:  # a file libjpeg or libpng rejects, or a torchvision built without them
                img = None
            if img is not None:
                return img
        try:
            return pillow_image(im, channels)
        except Exception as exc:  # Pillow raises many types for damaged files
            raise _unreadable(path, exc) from None


def pillow_image(im: Image.Image, channels: int) -> torch.Tensor:
    """An open Pillow image decoded as ``channels`` uint8 channels (C, H, W): 16-bit and float images stretched to
    0-255 (:func:`_stretch_to_uint8`), everything else converted to ``L`` or ``RGB``."""
    im.load()
    if im.mode.startswith(("I", "F")):
        arr = _stretch_to_uint8(np.asarray(im, dtype=np.float64))
        if channels == 3:
            arr = np.repeat(arr[..., None], 3, axis=2)
    else:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def stored_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """The image a file stands for in a dataset of ``size`` px and ``channels`` channels: read, resized so its
    shorter side is ``size``, centre-cropped to a square; uint8 (channels, size, size). The image cache holds these."""
    img = _read_image(path, channels)
    height, width = img.shape[-2:]
    limit = Image.MAX_IMAGE_PIXELS  # None: the user turned Pillow's bomb check off
    if limit is not None and size * size * max(height, width) / min(height, width) > limit:
        # resized before the crop, a strip of pixels would become a decompression bomb of its own
        raise _unreadable(path, f"{width} x {height} px is too elongated to resize to {size} px; crop the image")
    return _fit(img, size)


def load_dataset(
    spec: str,
    image_size: int | None = None,
    channels: int | None = None,
    train_per_class: int | None = None,
    seed: int = 0,
    cache: bool = True,
) -> DataSpec:
    """Load a dataset by specification.

    Args:
        spec: ``synthrad[:task][?opts]``, ``imagefolder:PATH`` or ``medmnist:PATH.npz``.
        image_size: side of the square images handed out (None: the data's own size, 64 for synthrad).
        channels: convert images to this many channels (None: the data's own).
        train_per_class: keep at most this many training images per class (few-shot), chosen by ``seed``.
        seed: selects the few-shot subset.
        cache: keep an image folder's stored images in the image cache (:mod:`classifiers.imagecache`; also off when
            ``NOISEMASK_IMAGE_CACHE=0``), building it on first use. Without it, each file is checked when first read.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset {spec!r} is empty; use synthrad, imagefolder:PATH or medmnist:PATH.npz")
    if image_size is not None and image_size < 8:
        raise DataError(f"image size {image_size} is too small; use 8 or more")
    if spec.startswith("synthrad"):
        data = _load_synthrad(spec, image_size)
    elif spec.startswith("imagefolder:"):
        # a few-shot run reads its few training images from their files: no cache of the whole split for them
        data = _load_imagefolder(spec, image_size, channels, cache, cache_train=train_per_class is None)
    elif spec.startswith("medmnist:"):
        data = _load_medmnist(spec, image_size)
    else:
        raise DataError(f"unknown dataset {spec!r}; use synthrad, synthrad:unseen, imagefolder:PATH "
                        "or medmnist:PATH.npz")
    if channels is not None and channels != data.in_channels:
        for s in data.splits.values():
            if s.images is not None:
                s.images = _to_channels(s.images, channels)
        data.in_channels = channels
    if train_per_class is not None:
        if train_per_class < 1:
            raise DataError(f"train_per_class={train_per_class} must be at least 1")
        data.splits["train"] = few_shot(data.splits["train"], train_per_class, seed)
    return data


class _StoredImages(Dataset):
    """A split's stored images in file order, for the cache's build. A file that cannot be read gives a blank image
    and its one-line message, so the build stops on it with that message whatever process read it."""

    def __init__(self, files: list[Path], size: int, channels: int) -> None:
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return stored_image(self.files[i], self.size, self.channels), ""
        except DataError as exc:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), str(exc)


def _cache_split(files: list[Path], data: DataSpec, name: str, origin: str) -> CachedImages | None:
    """Open or build the image cache of one split (None: read the files; see :mod:`classifiers.imagecache`)."""
    stored = _StoredImages(files, data.image_size, data.in_channels)

    def images() -> Iterator[torch.Tensor]:
        # Nothing else runs while the cache is built (the machine's other processes wait for it): every core
        # decodes, on machines where workers pay (see auto_workers). In batches: handing over one image from a
        # worker costs more than a copy.
        cores = available_cores(shared=False)
        workers = cores if cores >= MIN_CORES_FOR_WORKERS and len(files) >= BUILD_BATCH * cores else 0
        for batch, errors in DataLoader(stored, batch_size=BUILD_BATCH, num_workers=workers):
            for error in errors:
                if error:
                    raise DataError(error)
            yield from batch

    try:
        return open_or_build(files, data.image_size, data.in_channels, name, origin, images)
    except OSError as exc:  # stat'ing the files for the cache's key
        raise _unreadable(Path(exc.filename or "?"), f"{type(exc).__name__}: {exc.strerror or exc}") from None


def few_shot(source: ImageSource, per_class: int, seed: int) -> ImageSource:
    """Keep at most ``per_class`` images of each class, chosen at random by ``seed``, in original order."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(source.labels):
        idx = np.flatnonzero(source.labels == c)
        keep.append(np.sort(rng.permutation(idx)[:per_class]))
    sel = np.sort(np.concatenate(keep))
    index = torch.from_numpy(sel)
    return ImageSource(
        labels=source.labels[sel],
        images=source.images[index] if source.images is not None else None,
        files=[source.files[i] for i in sel] if source.files else [],
        modality=source.modality[sel] if source.modality is not None else None,
        regions=source.regions[index] if source.regions is not None else None,
        cached=source.cached.subset(sel) if source.cached is not None else None,
    )


class ImageDataset(Dataset):
    """uint8 (C, H, W) images and labels of one split; training samples are augmented.

    Indexed by ``(index, aug_seed)`` pairs (see :class:`EpochSampler`) or plain indices (no augmentation).
    """

    def __init__(self, source: ImageSource, image_size: int, channels: int, train: bool) -> None:
        self.source, self.size, self.channels, self.train = source, image_size, channels, train
        self.augment = v2.Compose([
            v2.RandomResizedCrop(image_size, scale=CROP_SCALE, antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, i: int) -> torch.Tensor:
        """The stored image: held in memory, mapped from the image cache, or read from its file."""
        if self.source.images is not None:
            return _fit(self.source.images[i], self.size)
        if self.source.cached is not None:
            return self.source.cached[i]
        return stored_image(self.source.files[i], self.size, self.channels)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, aug_seed = item if isinstance(item, tuple) else (item, None)
        img = self._image(i)
        if self.train and aug_seed is not None:
            with torch.random.fork_rng(devices=[]):
                # Only the CPU generator the transforms draw from. torch.manual_seed would also reseed every
                # CUDA device (which fork_rng(devices=[]) does not restore: with workers=0 the GPU's mask
                # sampling would follow the last image's augmentation seed), and it costs more than the
                # augmentation itself.
                torch.default_generator.manual_seed(aug_seed)
                img = self.augment(img)
        return img, int(self.source.labels[i])


class EpochSampler(Sampler):
    """Deterministic shuffled order per epoch, shardable over ranks, startable mid-epoch.

    Yields ``(index, aug_seed)`` pairs. With ``num_replicas`` ranks, each rank takes every
    ``num_replicas``-th index of the same permutation (padded by wrap-around to equal length), like
    ``torch.utils.data.DistributedSampler``, so N ranks with batch B see what one process with
    batch N*B sees.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, num_replicas: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.num_replicas = n, seed, shuffle, rank, num_replicas
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(n / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; skip the first ``start`` samples of this rank (for resuming)."""
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = self.per_rank * self.num_replicas
        perm = (perm * math.ceil(total / self.n))[:total]
        return perm[self.rank :: self.num_replicas]

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in self.order()[self.start :]:
            yield (i, (base + i) % (2**63 - 1))

    def __len__(self) -> int:
        return self.per_rank - self.start


def available_cores(shared: bool = True) -> int:
    """CPU cores this process may use (its affinity mask where the system has one); with ``shared``, its share
    of them among the processes torchrun started on this machine (``LOCAL_WORLD_SIZE``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1") if shared else 1))


def auto_workers(source: ImageSource) -> int:
    """DataLoader workers for ``source`` when none are asked for.

    0 when the images are in memory or in the image cache: a sample is then a copy and an augmentation, cheaper
    than handing it over from another process. Files decoded every epoch get half the cores (the training
    process keeps the other half), at most :data:`MAX_WORKERS`, and none on machines of fewer than
    :data:`MIN_CORES_FOR_WORKERS` cores per process, where workers and the model compete for the same cores: on
    2 cores, workers made training slower with and without the cache (benchmarks/RESULTS.md, "Image folders").
    """
    cores = available_cores()
    if source.images is not None or source.cached is not None or cores < MIN_CORES_FOR_WORKERS:
        return 0
    return min(MAX_WORKERS, cores // 2)


def make_loader(
    data: DataSpec,
    split: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    workers: int | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    num_replicas: int = 1,
) -> DataLoader:
    """A DataLoader over one split yielding uint8 (B, C, H, W) batches and int64 labels.

    Training loaders shuffle with an :class:`EpochSampler` (call ``loader.sampler.set_epoch``) and
    drop the last incomplete batch so every step has the same batch size; evaluation loaders keep
    every image, in order. ``workers`` worker processes read the images (None: :func:`auto_workers`).
    """
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} must be at least 1")
    if split not in data.splits:
        raise DataError(f"dataset {data.name} has no {split!r} split (it has {sorted(data.splits)})")
    source = data.splits[split]
    if train and len(source) // num_replicas < batch_size:
        raise DataError(f"the {split} split of {data.name} has {len(source)} images, fewer than one batch of "
                        f"{batch_size} per process; lower the batch size")
    dataset = ImageDataset(source, data.image_size, data.in_channels, train)
    sampler = EpochSampler(len(source), seed, shuffle=train, rank=rank, num_replicas=num_replicas)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=auto_workers(source) if workers is None else workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Its own generator: starting an epoch or an evaluation pass never draws from the global RNG,
        # so evaluating does not change what training samples next.
        generator=torch.Generator().manual_seed(seed),
    )
