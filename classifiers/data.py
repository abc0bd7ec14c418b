"""Datasets and loaders: every loader hands out ``uint8`` batches (B, C, H, W) and int64 labels.

Dataset specifications (``--dataset``):

- ``synthrad`` / ``synthrad:pretrain``, ``synthrad:unseen``, ``synthrad:shifted``: the embedded generator
  (``shifted`` is the pretraining task tested on images whose modality is independent of the class). Options after
  ``?`` as ``key=value`` pairs joined by ``&`` (``synthrad:unseen?n_train=600&seed=3``) set any
  :class:`~classifiers.synthrad.SynthRadConfig` field but the image size.
- ``imagefolder:PATH``: RadImageNet's layout, ``PATH/train/<class>/*``, ``PATH/val/<class>/*`` and
  optionally ``PATH/test/<class>/*``; any image Pillow reads, grayscale or colour.
- ``medmnist:PATH.npz``: MedMNIST's arrays ``train_images``, ``train_labels``, ``val_*``, ``test_*``.

Augmentation (training only) is torchvision's RandomResizedCrop and RandomHorizontalFlip on uint8
tensors. Each sample's augmentation is seeded from (seed, epoch, index), so a run is reproducible
whatever the number of workers, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from classifiers.synthrad import SynthRadConfig, class_names, load_synthrad, preferred_modality

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
SYNTHRAD_SPLITS = ("train", "val", "test", "shifted")
"""The splits synthrad generates; ``shifted`` (the pretraining task's only) tests on modalities independent of the
class. ``synthrad:shifted`` makes it the test split."""
CROP_SCALE = (0.6, 1.0)
"""RandomResizedCrop's area range; narrower than torchvision's default so small lesions survive."""


class DataError(ValueError):
    """The data given cannot be used; the message names the problem and the fix."""


@dataclass
class ImageSource:
    """Where images come from: either in-memory uint8 arrays or a list of files."""

    labels: np.ndarray
    images: torch.Tensor | None = None
    files: list[Path] = field(default_factory=list)
    modality: np.ndarray | None = None
    """Each image's modality index, where the data knows it (synthrad)."""
    regions: torch.Tensor | None = None
    """Each image's region map (N, H, W) uint8: 0 background, 1 anatomy, 2 lesion, where the data knows it."""

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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def in_preferred_modality(self, split: str) -> np.ndarray | None:
        """Per image of ``split``: whether it is shown in its class's preferred modality (None where unknown)."""
        source = self.splits[split]
        if self.preferred_modality is None or source.modality is None:
            return None
        return source.modality == self.preferred_modality[source.labels]

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
        try:
            opts[key] = float(value) if key == "modality_bias" else int(value)
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
                             modality=arrays[f"{s}_modality"], regions=torch.from_numpy(arrays[f"{s}_regions"]))
              for s in SYNTHRAD_SPLITS if f"{s}_labels" in arrays}
    if shifted:
        splits["test"] = splits.pop("shifted")
    preferred = preferred_modality(task, np.arange(len(class_names(task))))
    return DataSpec(f"synthrad:{name}", class_names(task), 1, cfg.image_size, splits, preferred)


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


def _load_imagefolder(spec: str, image_size: int | None) -> DataSpec:
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
            imgs = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not imgs:
                raise DataError(f"dataset {spec!r}: class folder {sub} holds no images "
                                f"(suffixes {sorted(IMAGE_SUFFIXES)}); add images or remove the folder")
            files += imgs
            labels += [index[sub.name]] * len(imgs)
        if not files:
            raise DataError(f"dataset {spec!r}: {folder} has no class folders with images")
        splits[split] = ImageSource(labels=np.array(labels, dtype=np.int64), files=files)
    first = _read_image(splits["train"].files[0], None)
    channels = first.shape[0]
    size = image_size or min(first.shape[-2:])
    return DataSpec(f"imagefolder:{root.name}", classes, channels, size, splits)


def _stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit or float images (CT, MR) to uint8 by stretching the image's own range to 0..255.

    Pillow's ``convert("L")`` clips such images instead of rescaling them (a 16-bit CT becomes almost all
    white), so they are windowed here per image, from their minimum to their maximum."""
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _read_image(path: Path, channels: int | None) -> torch.Tensor:
    """Read one image file as uint8 (C, H, W); grayscale stays 1 channel unless ``channels`` says otherwise."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith(("I", "F")):
                arr = _stretch_to_uint8(np.asarray(im, dtype=np.float64))
                if channels == 3:
                    arr = np.repeat(arr[..., None], 3, axis=2)
            else:
                mode = "L" if im.mode in ("L", "1", "P", "LA") and channels != 3 else "RGB"
                if channels == 1:
                    mode = "L"
                arr = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); replace or remove the file") \
            from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def load_dataset(
    spec: str,
    image_size: int | None = None,
    channels: int | None = None,
    train_per_class: int | None = None,
    seed: int = 0,
    check_files: bool = True,
) -> DataSpec:
    """Load a dataset by specification.

    Args:
        spec: ``synthrad[:task][?opts]``, ``imagefolder:PATH`` or ``medmnist:PATH.npz``.
        image_size: side of the square images handed out (None: the data's own size, 64 for synthrad).
        channels: convert images to this many channels (None: the data's own).
        train_per_class: keep at most this many training images per class (few-shot), chosen by ``seed``.
        seed: selects the few-shot subset.
        check_files: open every image file once, so an unreadable one is reported before training.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset {spec!r} is empty; use synthrad, imagefolder:PATH or medmnist:PATH.npz")
    if image_size is not None and image_size < 8:
        raise DataError(f"image size {image_size} is too small; use 8 or more")
    if spec.startswith("synthrad"):
        data = _load_synthrad(spec, image_size)
    elif spec.startswith("imagefolder:"):
        data = _load_imagefolder(spec, image_size)
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
    if check_files:
        for name, s in data.splits.items():
            for f in s.files:
                _verify_image(f, name)
    return data


def _verify_image(path: Path, split: str) -> None:
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # Pillow raises many types for damaged files
        raise DataError(f"cannot read image {path} in split {split} ({type(exc).__name__}: {exc}); "
                        "replace or remove the file") from None


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
        self.resize = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, i: int) -> torch.Tensor:
        if self.source.images is not None:
            return self.source.images[i]
        return _to_channels(_read_image(self.source.files[i], self.channels), self.channels)

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
        elif img.shape[-2:] != (self.size, self.size):
            img = self.resize(img)
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


def make_loader(
    data: DataSpec,
    split: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    num_replicas: int = 1,
) -> DataLoader:
    """A DataLoader over one split yielding uint8 (B, C, H, W) batches and int64 labels.

    Training loaders shuffle with an :class:`EpochSampler` (call ``loader.sampler.set_epoch``) and
    drop the last incomplete batch so every step has the same batch size; evaluation loaders keep
    every image, in order.
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
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Its own generator: starting an epoch or an evaluation pass never draws from the global RNG,
        # so evaluating does not change what training samples next.
        generator=torch.Generator().manual_seed(seed),
    )
