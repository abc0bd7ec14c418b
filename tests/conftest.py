"""Shared fixtures: an isolated dataset cache, a tiny synthrad specification, tiny on-disk datasets."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SMALL_SYNTHRAD = "synthrad?n_train=240&n_val=48&n_test=48"
"""12 classes x 20 training images: generated in a fraction of a second at 32 px."""


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point NOISEMASK_CACHE at a temporary folder so no test reads or writes ~/.cache."""
    cache = tmp_path_factory.mktemp("noisemask-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOISEMASK_CACHE", str(cache))
        yield cache


@pytest.fixture(autouse=True, scope="session")
def torch_single_thread():
    """Run the suite's tiny tensor work on one thread, then restore the previous setting.

    At 32 px and batch 8 a second thread gains nothing, and on a shared or busy 2-core machine
    OpenMP's spinning threads make such tests several times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthrad_spec() -> str:
    """A small synthrad specification (see ``classifiers.data`` for the options)."""
    return SMALL_SYNTHRAD


def _random_image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    w, h = size
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
    raise ValueError(f"unsupported test image mode {mode!r}")


@pytest.fixture
def make_imagefolder(tmp_path: Path) -> Callable[..., Path]:
    """Build ``ROOT/<split>/<class>/img<i>.<ext>`` with random images; returns ROOT.

    ``mode`` is ``L`` (grayscale) or ``RGB``; ``fmt`` a Pillow format (``PNG``, ``JPEG``).
    """
    counter = iter(range(1000))

    def build(
        classes: Iterable[str] = ("cat", "dog", "eel"),
        per_class: int = 4,
        mode: str = "L",
        fmt: str = "PNG",
        size: tuple[int, int] = (24, 20),
        splits: Iterable[str] = ("train", "val"),
    ) -> Path:
        root = tmp_path / f"imagefolder{next(counter)}"
        ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp"}[fmt]
        rng = np.random.default_rng(0)
        for split in splits:
            for c in classes:
                folder = root / split / c
                folder.mkdir(parents=True)
                for i in range(per_class):
                    _random_image(rng, size, mode).save(folder / f"img{i}.{ext}", format=fmt)
        return root

    return build


@pytest.fixture
def make_medmnist(tmp_path: Path) -> Callable[..., Path]:
    """Write a MedMNIST-style ``.npz`` (``{split}_images`` uint8, ``{split}_labels`` (N, 1)); returns its path.

    ``rgb`` gives (N, H, W, 3) images, otherwise (N, H, W). ``overrides`` replaces arrays by name
    (a value of None removes the array).
    """
    counter = iter(range(1000))

    def build(
        n: dict[str, int] | None = None,
        size: int = 28,
        rgb: bool = False,
        num_classes: int = 3,
        overrides: dict[str, np.ndarray | None] | None = None,
    ) -> Path:
        n = n or {"train": 12, "val": 6, "test": 6}
        rng = np.random.default_rng(1)
        arrays: dict[str, np.ndarray] = {}
        for split, count in n.items():
            shape = (count, size, size, 3) if rgb else (count, size, size)
            arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(count) % num_classes).astype(np.uint8).reshape(-1, 1)
        for key, value in (overrides or {}).items():
            if value is None:
                arrays.pop(key, None)
            else:
                arrays[key] = value
        path = tmp_path / f"medmnist{next(counter)}.npz"
        np.savez(path, **arrays)
        return path

    return build
