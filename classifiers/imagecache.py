"""The image cache: a folder's images decoded and resized once, then memory-mapped by every run that reads them.

One split of an image folder, at image size S with C channels, is stored as one ``.npy`` array of shape
(N, C, S, S) uint8: each file's image exactly as :class:`classifiers.data.ImageDataset` hands it out before
augmentation. A run therefore reads the same tensors with the cache as without it, and a run resumed on another
machine, with or without a cache, sees the same batches.

Where. ``<cache>/images/``, beside the synthrad cache (``$NOISEMASK_CACHE``, default ``~/.cache/noisemask``):
everything the project can regenerate lives in one folder that one variable moves to a larger or faster disk, and
the image folders themselves are often read-only or shared. ``NOISEMASK_IMAGE_CACHE=0`` turns the cache off (the
images are then decoded every epoch). The cache needs ``N * C * S * S`` bytes; with less free space the images are
read uncached, with a warning.

Key. The file list (paths, in order), each file's size and modification time, S, C and :data:`FORMAT`: a changed,
added, removed or renamed file, another size or another channel count gives another key and so another file. Once a
new cache is complete, the older caches of the same folder, split, size and channels are deleted.

Atomic. The array is written into a temporary file beside its final name and renamed once complete
(:func:`classifiers.io.atomic_write`), so a file under the final name is complete and an interrupted build leaves
none. The build decodes every file, which is also the check that every file can be read: a cache hit needs no check.

Processes. Under torchrun, local rank 0 of each machine builds while the other processes wait for the file; every
process then maps the same file, read-only, and the operating system shares its pages between them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from classifiers.io import atomic_write
from classifiers.synthrad import default_cache_dir

FORMAT = 1
"""Version of what a cached image is; raise it when that changes, so older caches are not taken for current."""
SPARE_BYTES = 1 << 30
"""Free space a build leaves on the cache's disk."""
OFF_VALUES = ("0", "off", "false", "no")


def cache_enabled() -> bool:
    """Whether image folders are cached: unless ``NOISEMASK_IMAGE_CACHE`` is 0, off, false or no."""
    return os.environ.get("NOISEMASK_IMAGE_CACHE", "1").strip().lower() not in OFF_VALUES


def image_cache_dir() -> Path:
    """``<cache>/images`` (see the module docstring)."""
    return default_cache_dir() / "images"


def content_key(files: Sequence[Path], size: int, channels: int) -> str:
    """A hash of the file list, each file's size and modification time (nanoseconds), the image size, the channel
    count and :data:`FORMAT`. Raises ``OSError`` (with the file name) for a file that cannot be stat'ed."""
    h = hashlib.sha256(f"noisemask-images {FORMAT} {size} {channels} {len(files)}\n".encode())
    for f in files:
        st = os.stat(f)  # absolute paths: a folder named relatively and absolutely gets one key
        h.update(os.fsencode(os.path.abspath(f)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class CachedImages:
    """Rows of a cache file, read as uint8 (C, S, S) tensors from its memory map.

    Forked DataLoader workers share the map; workers started by spawn or forkserver map the file themselves rather
    than receive a copy of it."""

    def __init__(self, path: Path, rows: np.ndarray, array: np.ndarray | None = None) -> None:
        self.path, self.rows, self._array = path, rows, array

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[self.rows[i]]))

    def subset(self, indices: np.ndarray) -> CachedImages:
        """The images at ``indices`` of this one, in that order."""
        return CachedImages(self.path, self.rows[indices], self._array)

    def __getstate__(self) -> dict:
        return {"path": self.path, "rows": self.rows, "_array": None}


def _open(path: Path, shape: tuple[int, ...]) -> CachedImages | None:
    """The cache at ``path`` when it holds an array of ``shape``; None when it is missing or holds anything else."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        warnings.warn(f"image cache {path} is unreadable ({exc}); rebuilding it", stacklevel=3)
        return None
    if array.shape != shape or array.dtype != np.uint8:
        warnings.warn(f"image cache {path} holds {array.dtype} {array.shape}, not uint8 {shape}; rebuilding it",
                      stacklevel=3)
        return None
    return CachedImages(path, np.arange(shape[0]), array)


def _build(path: Path, shape: tuple[int, ...], images: Iterator[torch.Tensor], desc: str) -> None:
    """Write ``images`` (each of ``shape[1:]``, in order) as an ``.npy`` array of ``shape`` at ``path``, atomically."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}

    def write(fh) -> None:
        np.lib.format.write_array_header_1_0(fh, header)
        count = 0
        with tqdm(total=shape[0], desc=desc, unit="img", disable=None) as bar:  # no bar when stderr is no terminal
            for img in images:
                fh.write(img.numpy().tobytes())
                count += 1
                bar.update(1)
        if count != shape[0]:
            raise RuntimeError(f"the image cache build got {count} images for {shape[0]} files")

    atomic_write(path, write)


def _progress(path: Path) -> tuple[tuple[int, int], ...]:
    """The sizes and modification times of the temporary files of builds of ``path``: they change while a build
    writes, and stay as they are in a file a killed build left behind."""
    marks = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            st = tmp.stat()
        except OSError:
            continue
        marks.append((st.st_size, st.st_mtime_ns))
    return tuple(sorted(marks))


def _wait_for(path: Path, shape: tuple[int, ...], patience: float) -> CachedImages | None:
    """Wait for another process's build of ``path``; None once no build has made progress for ``patience`` seconds
    (a temporary file that stopped growing is a killed build's, not a build in progress)."""
    last_progress, seen = time.monotonic(), _progress(path)
    while True:
        cached = _open(path, shape)
        if cached is not None:
            return cached
        now = _progress(path)
        if now != seen:
            last_progress, seen = time.monotonic(), now
        elif time.monotonic() - last_progress > patience:
            warnings.warn(f"no process built the image cache {path}; reading the images uncached", stacklevel=3)
            return None
        time.sleep(min(1.0, patience))


def _remove_stale_builds(folder: Path, stem: str, age: float) -> None:
    """Delete temporary files of builds of ``stem``'s caches untouched for ``age`` seconds: a killed build's
    leftovers, each as large as its cache (a build in progress writes every image as it goes)."""
    cutoff = time.time() - age
    for tmp in folder.glob(f".{stem}-*.npy.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink(missing_ok=True)
        except OSError:
            continue


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "images"


def open_or_build(
    files: Sequence[Path],
    size: int,
    channels: int,
    name: str,
    origin: str,
    images: Callable[[], Iterator[torch.Tensor]],
    patience: float = 60.0,
) -> CachedImages | None:
    """The cache of ``files`` at ``size`` px and ``channels`` channels: opened if present, else built.

    Args:
        files: the split's image files, in the order of its samples.
        size: image side S.
        channels: channel count C.
        name: names the folder and split in the file name and the progress bar, e.g. ``brain-mri train``.
        origin: identifies the folder and split (its resolved path): older caches of the same origin, size and
            channels are deleted once a new one is complete.
        images: ``images()`` yields the N stored images, uint8 (C, S, S), in order; called for a build only.
        patience: seconds a process that does not build waits without seeing the build progress.

    Returns None (the caller reads the files) when the cache is turned off, when its disk lacks the space, when it
    cannot be written, or when this process waited for another's build that did not come. Raises ``OSError`` naming
    a file that cannot be stat'ed; what ``images`` raises passes through, and the partial file is removed.
    """
    if not cache_enabled():
        return None
    shape = (len(files), channels, size, size)
    folder = image_cache_dir()
    stem = f"{_safe(name)}-{size}px-{channels}ch-{hashlib.sha256(origin.encode()).hexdigest()[:8]}"
    path = folder / f"{stem}-{content_key(files, size, channels)[:20]}.npy"
    cached = _open(path, shape)
    if cached is not None:
        return cached
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return _wait_for(path, shape, patience)
    needed = int(np.prod(shape))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(folder, stem, patience)
        free = shutil.disk_usage(folder).free
        if needed + SPARE_BYTES > free:
            warnings.warn(f"the image cache of {name} needs {needed / 1e9:.1f} GB but {folder} has "
                          f"{free / 1e9:.1f} GB free; reading the images uncached (set NOISEMASK_CACHE to a folder "
                          "on a larger disk to cache them)", stacklevel=2)
            return None
        _build(path, shape, images(), f"caching {name} ({needed / 1e6:.0f} MB)")
    except OSError as exc:  # the cache's folder or disk; unreadable images raise the caller's own errors
        warnings.warn(f"could not write the image cache {path} ({exc}); reading the images uncached (set "
                      "NOISEMASK_CACHE to a writable folder)", stacklevel=2)
        return None
    for old in folder.glob(f"{stem}-*.npy"):
        if old != path:
            old.unlink(missing_ok=True)
    return _open(path, shape)
