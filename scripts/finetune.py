#!/usr/bin/env python
"""Fine-tune a heated model (or a fresh classifier) on clean images of a target task; report the paper's metrics.

    python scripts/finetune.py --init runs/<run>/heated.pt --dataset synthrad:unseen --epochs 1
    python scripts/finetune.py --init runs/<run>/heated.pt --dataset synthrad:unseen --train-per-class 10
    python scripts/finetune.py --init scratch --classifier resnet18 --dataset imagefolder:/data/target
    python scripts/finetune.py --init runs/<run>/heated.pt --lr 0.05          # a fixed rate instead of --lr auto
    python scripts/finetune.py --init runs/<run>/heated.pt --recipe paper     # constant 1e-3, 7 of 10 epochs warm-up
    torchrun --nproc_per_node=4 scripts/finetune.py --init runs/<run>/heated.pt ...           # several GPUs

The peak learning rate is chosen from the data unless --lr fixes it (--lr auto, the default): each candidate rate
trains briefly on the training split and the best on the validation split wins; the test split is never read. The run
prints its choice in one line, and config.json records it with every candidate's score (lr_search).

The images are converted to the heated model's channel count and (unless --image-size says otherwise) size.
--classifier and --channels are for --init scratch (--image-size default: the data's own). The run folder
gets model.pt (scripts/predict.py applies it to new images), metrics.json and the confusion matrix, ROC curves and
reliability diagram as PNGs (test split, val when there is none). Resume an interrupted run by repeating its command
with --resume.
"""

from __future__ import annotations

import argparse
import json
import sys

from classifiers.cli import add_common_arguments, fail_cleanly
from classifiers.distributed import is_main
from classifiers.figures import FIGURES
from classifiers.finetune import (
    AUTO,
    AUTO_CANDIDATES,
    AUTO_MAX_STEPS,
    AUTO_MIN_STEPS,
    AUTO_SHARE,
    RECIPES,
    SCHEDULES,
    FinetuneConfig,
    finetune,
)
from classifiers.metrics import METRIC_NAMES
from classifiers.models import ARCHITECTURES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="a heated.pt (or model.pt) file, or 'scratch'")
    add_common_arguments(p, default_dataset="synthrad:unseen", classifiers=ARCHITECTURES)
    p.set_defaults(classifier=None, image_size=None, epochs=None)
    p.add_argument("--channels", type=int, default=None, choices=(1, 3), help="scratch: image channels")
    p.add_argument("--new-head", action="store_true", help="replace the head even when the class count matches")
    p.add_argument("--linear-probe", action="store_true", help="train a fresh head on frozen features (the backbone's "
                   "weights and BatchNorm statistics stay as given)")
    recipes = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in r.items()) for name, r in RECIPES.items())
    p.add_argument("--recipe", choices=tuple(RECIPES), default="default", help="the defaults of --lr, --schedule, "
                   f"--warmup-epochs and --epochs, which override them ({recipes})")
    candidates = ", ".join(map(str, AUTO_CANDIDATES))
    p.add_argument("--lr", type=_rate, default=None, help=f"peak SGD rate, or {AUTO} (the default recipe's): each of "
                   f"{candidates} trains for {AUTO_SHARE:.0%}% of the run's steps (at least {AUTO_MIN_STEPS}, at most "
                   f"{AUTO_MAX_STEPS}, at most the run) under its schedule compressed to them, and the best on the "
                   "validation split is kept")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--warmup-epochs", type=float, default=None, help="epochs of per-step linear warm-up "
                   "(default 1; the paper: 7 of 10)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning rate after the warm-up: a half "
                   "cosine towards 0 (default: the final model is within about 0.01 of its best epoch) or constant "
                   "(the paper's)")
    p.add_argument("--train-per-class", type=int, default=None, help="few-shot: K training images per class")
    p.add_argument("--log-every", type=int, default=10, help="steps between scalar logs")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    return p.parse_args(argv)


def _rate(text: str) -> float | str:
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor {AUTO!r}") from None


def config_from_args(a: argparse.Namespace) -> FinetuneConfig:
    recipe = {k: v if getattr(a, k) is None else getattr(a, k) for k, v in RECIPES[a.recipe].items()}
    return FinetuneConfig(
        init=a.init, dataset=a.dataset, classifier=a.classifier, image_size=a.image_size, channels=a.channels,
        new_head=a.new_head, linear_probe=a.linear_probe, momentum=a.momentum, weight_decay=a.weight_decay,
        **recipe, batch_size=a.batch_size,
        train_per_class=a.train_per_class, seed=a.seed, device=a.device, precision=a.precision,
        workers=a.workers,
        run_dir=a.run_dir or "", log_every=a.log_every, ckpt_every=a.ckpt_every)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resume and not args.run_dir:
        raise ValueError("--resume needs the --run-dir of the run to continue")
    run_dir = finetune(config_from_args(args), resume=args.resume)
    if not is_main():
        return 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"{metrics['split']} split ({metrics['num_images']} images, head {metrics['head']}): "
          + ", ".join(f"{k} {metrics[k]:.4f}" for k in (*METRIC_NAMES, "ece")))
    print(f"run folder: {run_dir}\nmodel: {run_dir / 'model.pt'} (new images: scripts/predict.py --model "
          f"{run_dir / 'model.pt'} --images DIR)\nmetrics: {run_dir / 'metrics.json'}\n"
          f"figures: {', '.join(str(run_dir / f'{name}.png') for name in FIGURES)}\n"
          f"TensorBoard: tensorboard --logdir {run_dir.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(fail_cleanly(main))
