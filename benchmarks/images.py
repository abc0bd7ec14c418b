#!/usr/bin/env python
"""Images per second of reading an image folder through the training loader: Pillow, torchvision.io, the cache.

    python benchmarks/images.py                          # 2,000 JPEGs of 200-600 px, grayscale and colour, 64 px
    python benchmarks/images.py --classifier smallcnn    # with a training step per batch: what a run sees
    python benchmarks/images.py --folder /data/brain-mri --image-size 224 --workers 4

A folder of JPEGs (two classes, sides drawn from 200-600 px, half grayscale, half colour; smooth fields with
noise, saved at quality 90) is written to a temporary folder, unless ``--folder`` names one. Each row reads one
training epoch (shuffled, augmented, batch ``--batch-size``) through ``classifiers.data.make_loader``:

- ``pillow (before)``: each file decoded by Pillow, as the loader did before torchvision.io (the former reader,
  below), after the former start-up check of every file (Pillow's ``verify``);
- ``torchvision.io``: each file decoded by torchvision.io every epoch, the image cache off;
- ``cache cold``: the image cache built at start-up (decoding every file once), then the epoch read from it;
- ``cache warm``: a later start: the cache found by its key, the epoch read from it.

"start-up" is ``load_dataset`` (and the former check); images/s is for the epoch alone. Rows are measured in
turn, ``--rounds`` times (a fresh cache for every cold row); the table gives the medians. The cache lives in a
temporary folder. ``--classifier`` adds an SGD step of that classifier on every batch, on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifiers import data as data_module  # noqa: E402
from classifiers.data import _mode_channels, load_dataset, make_loader, pillow_image  # noqa: E402
from classifiers.models import build_classifier  # noqa: E402
from classifiers.train import Normalizer  # noqa: E402

ROWS = ("pillow (before)", "torchvision.io", "cache cold", "cache warm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=None, help="an image folder (PATH/train/<class>/*, PATH/val/...); "
                   "default: a generated one")
    p.add_argument("--n", type=int, default=2000, help="training images of the generated folder")
    p.add_argument("--min-side", type=int, default=200, help="smallest side of the generated images")
    p.add_argument("--max-side", type=int, default=600, help="largest side of the generated images")
    p.add_argument("--image-size", type=int, default=64, help="image side the loader hands out")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="convert the images to this many channels (default: the first image's; 1 here)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the epoch")
    p.add_argument("--classifier", default=None, help="also train this classifier on every batch (e.g. smallcnn)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_folder(root: Path, n: int, sides: tuple[int, int], seed: int) -> Path:
    """``root/train/{a,b}`` with ``n`` JPEGs and ``root/val/{a,b}`` with 8: smooth random fields plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 8)):
        for i in range(count):
            w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
            coarse = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float64)
            pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
            im = Image.fromarray(pixels)
            folder = root / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            (im.convert("L") if i % 4 < 2 else im).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def pil_read_image(path: Path, channels: int | None) -> torch.Tensor:
    """The former reader: Pillow decodes every file (``classifiers.data._read_image`` before torchvision.io)."""
    with Image.open(path) as im:
        return pillow_image(im, channels or _mode_channels(im.mode))


def pil_verify(files: list[Path]) -> None:
    """The former start-up check: Pillow's ``verify`` of every file."""
    for f in files:
        with Image.open(f) as im:
            im.verify()


def epoch(spec: str, args: argparse.Namespace, cache: bool, before: bool = False) -> tuple[float, float]:
    """Seconds of start-up and images/s of one training epoch."""
    t0 = time.perf_counter()
    data = load_dataset(spec, image_size=args.image_size, channels=args.channels, cache=cache)
    if before:
        pil_verify(data.splits["train"].files + data.splits["val"].files)
    start = time.perf_counter() - t0
    loader = make_loader(data, "train", args.batch_size, train=True, seed=args.seed, workers=args.workers)
    loader.sampler.set_epoch(0)
    step = None
    if args.classifier:
        torch.manual_seed(args.seed)
        model = build_classifier(args.classifier, data.num_classes, data.in_channels, args.image_size)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        norm = Normalizer()

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            loss = torch.nn.functional.cross_entropy(model(norm(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    n = 0
    t0 = time.perf_counter()
    for x, y in loader:
        if step is not None:
            step(x, y)
        n += len(x)
    return start, n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NOISEMASK_CACHE"] = str(Path(tmp) / "cache")
        root = Path(args.folder) if args.folder else make_folder(Path(tmp) / "images", args.n,
                                                                 (args.min_side, args.max_side), args.seed)
        spec = f"imagefolder:{root}"
        results: dict[str, list[tuple[float, float]]] = {row: [] for row in ROWS}
        for _ in range(args.rounds):
            with mock.patch.object(data_module, "_read_image", pil_read_image):
                results["pillow (before)"].append(epoch(spec, args, cache=False, before=True))
            results["torchvision.io"].append(epoch(spec, args, cache=False))
            for old in (Path(tmp) / "cache" / "images").glob("*.npy"):
                old.unlink()
            results["cache cold"].append(epoch(spec, args, cache=True))
            results["cache warm"].append(epoch(spec, args, cache=True))
        data = load_dataset(spec, image_size=args.image_size, channels=args.channels)
        n = len(data.splits["train"])
    print(f"{n} training images, {args.image_size} px, {data.in_channels} channel(s), batch {args.batch_size}, "
          f"workers {args.workers}, "
          f"{'training ' + args.classifier if args.classifier else 'no model'}, {args.rounds} round(s); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    base = statistics.median(r[1] for r in results[ROWS[0]])
    print("| reader | start-up (s) | epoch images/s | vs pillow | start-up and epoch, images/s |\n|-|-|-|-|-|")
    for row in ROWS:
        start = statistics.median(r[0] for r in results[row])
        rate = statistics.median(r[1] for r in results[row])
        print(f"| {row} | {start:.2f} | {rate:.0f} | {rate / base:.2f}x | {n / (start + n / rate):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
