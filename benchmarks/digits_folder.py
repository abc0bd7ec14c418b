#!/usr/bin/env python
"""Write a small, real-like image folder from scikit-learn's bundled handwritten digits (no download).

    python benchmarks/digits_folder.py runs/ft-sweep/digits    # then --dataset imagefolder:runs/ft-sweep/digits

``load_digits``' 1,797 images (10 classes, 8 x 8 px, 17 grey levels) are split 60/15/25 into ``train``, ``val`` and
``test`` class folders, each upsampled to a random side of 24 to 40 px, 30 % converted to RGB, half saved as PNG and
half as JPEG: mixed sizes, colour modes and formats, as a clinical folder has them. The same seed writes the same
files. benchmarks/RESULTS.md ("Fine-tuning recipes") uses it as the real-like target of the fine-tuning sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write (train/, val/, test/ with one subfolder per class)")
    p.add_argument("--seed", type=int, default=0, help="split, sizes, colour modes and formats")
    a = p.parse_args(argv)
    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(a.seed)
    order = rng.permutation(len(labels))
    n_train, n_val = int(0.6 * len(labels)), int(0.15 * len(labels))
    splits = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    root = Path(a.out)
    for split, indices in splits.items():
        for i in indices:
            folder = root / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            side = int(rng.integers(24, 41))
            im = Image.fromarray((images[i] / 16.0 * 255).astype(np.uint8), "L").resize((side, side), Image.BILINEAR)
            if rng.random() < 0.3:
                im = im.convert("RGB")
            im.save(folder / f"{i:04d}.{'png' if rng.random() < 0.5 else 'jpg'}", quality=90)
        print(f"{split}: {len(indices)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
