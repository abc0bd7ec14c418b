"""What the command-line scripts share: common arguments and one-line errors for bad input."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from classifiers.train import PRECISIONS, NonFiniteError


def add_common_arguments(p: argparse.ArgumentParser, default_dataset: str | None,
                         classifiers: tuple[str, ...]) -> None:
    """Arguments every training script takes: data, model, schedule, seed, device, precision, run folder."""
    p.add_argument("--dataset", default=default_dataset,
                   help="synthrad, synthrad:unseen, imagefolder:PATH or medmnist:PATH.npz")
    p.add_argument("--classifier", default="smallcnn", help=f"architecture: {', '.join(classifiers)}")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (per process)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training set")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="the classifier's arithmetic: bf16 autocast or fp32; auto: bf16 on a GPU that computes it "
                        "natively and on a CPU with AMX, fp32 elsewhere")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading worker processes (default: 0 for data in memory or in the image cache; "
                        "for images decoded every epoch, half the cores, at most 8, none below 4 cores)")
    p.add_argument("--run-dir", default=None, help="run folder (default: a new folder under runs/)")


def fail_cleanly(main: Callable[[], int]) -> int:
    """Run ``main``; turn bad input and guarded numerical failures into one line on stderr and exit code 2."""
    try:
        return main()
    except (ValueError, FileNotFoundError, NonFiniteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
