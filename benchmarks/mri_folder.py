#!/usr/bin/env python
"""Write a small, real-like brain-MRI folder from the MRI slice matplotlib ships (no download).

    python benchmarks/mri_folder.py runs/lr-auto/mri    # then --dataset imagefolder:runs/lr-auto/mri

matplotlib's sample data holds one sagittal MRI slice of a head (``s1045.ima.gz``, 256 x 256, the slice of its
``mri_demo`` example). Every image of the folder is a crop of it, 72 to 128 px wide and centred on the head, seen as
a scan differs from another: mirrored or turned by a quarter turn, a random gamma and gain, a linear intensity
gradient (coil inhomogeneity) and noise. Half the images get a lesion: a soft-edged ellipse, brighter than the
tissue around it by a random, often faint, contrast, somewhere in the head. Two classes, ``lesion`` and
``normal`` (a tumour-or-not folder), 2,000 images split 60/15/25 into ``train``, ``val`` and ``test``, each saved
at a random side of 48 to 96 px, 20 % of them as RGB, half as PNG and half as JPEG. The same seed writes the same
files. benchmarks/RESULTS.md ("Fine-tuning: the rate chosen from the data") uses it beside the digits folder
(``benchmarks/digits_folder.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image
from scipy import ndimage

CLASSES = ("lesion", "normal")
SPLITS = {"train": 0.60, "val": 0.15, "test": 0.25}


def mri_slice() -> np.ndarray:
    """matplotlib's sample MRI slice as float32 in [0, 1] (little-endian 16-bit words holding 8-bit values)."""
    with cbook.get_sample_data("s1045.ima.gz") as f:
        raw = np.frombuffer(f.read(), "<u2").reshape(256, 256).astype(np.float32)
    return raw / raw.max()


def scan(head: np.ndarray, inside: np.ndarray, lesion: bool, rng: np.random.Generator) -> np.ndarray:
    """One crop of the slice as a uint8 image, with a lesion or without."""
    side = int(rng.integers(72, 129))
    ys, xs = np.nonzero(inside)
    k = int(rng.integers(len(ys)))
    top = int(np.clip(ys[k] - side // 2, 0, head.shape[0] - side))
    left = int(np.clip(xs[k] - side // 2, 0, head.shape[1] - side))
    img = head[top:top + side, left:left + side].copy()
    tissue = inside[top:top + side, left:left + side]
    if lesion:
        ty, tx = np.nonzero(tissue[side // 5:-(side // 5), side // 5:-(side // 5)])
        j = int(rng.integers(len(ty)))
        ty, tx = ty + side // 5, tx + side // 5
        ry, rx = side * rng.uniform(0.08, 0.16, size=2)
        yy, xx = np.mgrid[:side, :side]
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - ty[j], xx - tx[j]
        u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
        blob = ndimage.gaussian_filter(((u / ry) ** 2 + (v / rx) ** 2 <= 1).astype(np.float32), sigma=side / 80)
        img = img + rng.uniform(0.15, 0.5) * blob * (0.3 + img)
    yy, xx = np.mgrid[:side, :side] / side - 0.5
    gy, gx = rng.uniform(-0.3, 0.3, size=2)
    img = img * (1 + gy * yy + gx * xx) * rng.uniform(0.8, 1.2)
    img = np.clip(img, 0, None) ** rng.uniform(0.7, 1.4)
    img = img + rng.normal(0, rng.uniform(0.01, 0.05), size=img.shape)
    img = np.rot90(img, int(rng.integers(4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write (train/, val/, test/ with one subfolder per class)")
    p.add_argument("--images", type=int, default=2000, help="images in all, half of each class")
    p.add_argument("--seed", type=int, default=0, help="crops, lesions, intensities, sizes, colour modes and formats")
    a = p.parse_args(argv)
    head = mri_slice()
    inside = ndimage.binary_erosion(ndimage.gaussian_filter(head, 2) > 0.25, iterations=3)
    rng = np.random.default_rng(a.seed)
    labels = rng.permutation(np.arange(a.images) % len(CLASSES))
    root = Path(a.out)
    start = 0
    for split, share in SPLITS.items():
        n = a.images - start if split == "test" else round(share * a.images)
        for i in range(start, start + n):
            folder = root / split / CLASSES[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            size = int(rng.integers(48, 97))
            im = Image.fromarray(scan(head, inside, CLASSES[labels[i]] == "lesion", rng), "L")
            im = im.resize((size, size), Image.BILINEAR)
            if rng.random() < 0.2:
                im = im.convert("RGB")
            im.save(folder / f"{i:04d}.{'png' if rng.random() < 0.5 else 'jpg'}", quality=90)
        print(f"{split}: {n} images")
        start += n
    return 0


if __name__ == "__main__":
    sys.exit(main())
