#!/usr/bin/env python
"""The comparison study: pretrain with each method, fine-tune on each target, compare with ordinary training.

    python scripts/compare.py --quick                 # the small study `make demo` runs (minutes on a CPU)
    python scripts/compare.py --seeds 0 1 2 --methods none uniform-mask reinforce scratch
    python scripts/compare.py --targets synthrad:unseen synthrad:unseen@10 --pretrain-epochs 30 --device cuda
    python scripts/compare.py --methods none reinforce ppo --pretrain-dataset imagefolder:/data/radimagenet \\
        --targets imagefolder:/data/target imagefolder:/data/target@20 --classifier resnet18

    python scripts/compare.py --methods none --modality-biases 0.3333 0.6 0.8 0.95   # the shortcut against the bias

A target is a dataset specification, with @K for K training images per class and a linear: prefix for a linear
probe on frozen features (linear:synthrad:shifted). --quick sets a small
preset; options given beside it override the preset. Rerunning with the same settings reuses finished
runs and resumes interrupted ones. Writes results.csv, results.md and results.png into --out.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from agents.registry import algo_names
from agents.study import BALANCED_BIAS, Study, StudyConfig, bias_sweep
from classifiers.cli import fail_cleanly
from classifiers.finetune import SCHEDULES, SCRATCH
from classifiers.train import PRECISIONS
from envs.masks import MASK_OPS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = StudyConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small preset `make demo` runs")
    p.add_argument("--methods", nargs="+", help=f"any of {', '.join(algo_names())}, {SCRATCH} "
                   f"(default: {' '.join(d.methods)})")
    p.add_argument("--seeds", nargs="+", type=int, help=f"paired seeds (default: {' '.join(map(str, d.seeds))})")
    p.add_argument("--pretrain-dataset", help=f"the pretraining task (default: {d.pretrain_dataset})")
    p.add_argument("--targets", nargs="+", help="target tasks, [linear:]DATASET[@K] (default for synthrad, with the "
                   "pretraining task's options: the task, synthrad:shifted, synthrad:unseen, "
                   f"synthrad:unseen@{d.fewshot_k}, linear:synthrad:shifted and the task at modality_bias "
                   f"{BALANCED_BIAS})")
    p.add_argument("--pretrain-only", action="store_true", help="no fine-tuning: report the heated models alone")
    p.add_argument("--modality-biases", nargs="+", type=float, help="pretrain on synthrad at each modality_bias "
                   "(pretraining only) and print the heated models' shortcut gap and shifted accuracy per bias")
    p.add_argument("--fewshot-k", type=int, help=f"K of the default few-shot target (default: {d.fewshot_k})")
    p.add_argument("--out", help=f"output folder (default: {d.out}; with --quick: {StudyConfig.quick().out})")
    p.add_argument("--classifier", help=f"classifier architecture (default: {d.classifier})")
    p.add_argument("--image-size", type=int, help=f"image side in pixels (default: {d.image_size})")
    p.add_argument("--batch-size", type=int, help=f"images per step (default: {d.batch_size})")
    p.add_argument("--grid", type=int, help=f"noise-mask grid side (default: {d.grid})")
    p.add_argument("--blur-kernel", type=int, help=f"mask blur kernel (default: {d.blur_kernel})")
    p.add_argument("--blur-sigma", type=float, help=f"mask blur sigma (default: {d.blur_sigma})")
    p.add_argument("--mask-op", choices=MASK_OPS, help="how every method's mask acts: multiply the image or blend it "
                   f"with a random restyling (default: {d.mask_op}; uniform-blend and reinforce-lff-blend blend)")
    p.add_argument("--pretrain-lr", type=float, help=f"pretraining learning rate (default: {d.pretrain_lr})")
    p.add_argument("--pretrain-epochs", type=int, help=f"pretraining epochs (default: {d.pretrain_epochs})")
    p.add_argument("--pretrain-steps", type=int, help="stop pretraining after this many steps")
    p.add_argument("--finetune-epochs", type=int, help=f"fine-tuning epochs (default: {d.finetune_epochs})")
    p.add_argument("--fewshot-epochs", type=int, help="fine-tuning epochs on few-shot targets "
                   "(default: --finetune-epochs)")
    rates = d.finetune_rates()
    p.add_argument("--finetune-lr", type=float, help=f"fine-tuning rate of heated models (default: {rates['heated']})")
    p.add_argument("--scratch-lr", type=float, help=f"rate of the scratch baseline (default: {rates[SCRATCH]})")
    p.add_argument("--probe-lr", type=float, help=f"rate of linear: targets (default: {rates['linear_probe']})")
    p.add_argument("--finetune-schedule", choices=SCHEDULES, help="fine-tuning rate after the warm-up, for every "
                   f"start (default: {d.finetune_schedule}; constant is the paper's)")
    p.add_argument("--warmup-epochs", type=float, help=f"fine-tuning warm-up epochs (default: {d.warmup_epochs})")
    p.add_argument("--device", help=f"auto, cpu or cuda (default: {d.device})")
    p.add_argument("--precision", choices=PRECISIONS, help="the classifiers' arithmetic: bf16 autocast or fp32; auto: "
                   f"bf16 on a GPU that computes it natively and on a CPU with AMX (default: {d.precision})")
    p.add_argument("--workers", type=int, help=f"data-loading worker processes (default: {d.workers})")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads (default: one per core; --quick: 1)")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> StudyConfig:
    """The preset (--quick or the defaults) with every option given on the command line laid over it."""
    cfg = StudyConfig.quick() if a.quick else StudyConfig()
    for f in fields(StudyConfig):
        value = getattr(a, f.name, None)
        if value is not None:
            setattr(cfg, f.name, tuple(value) if isinstance(value, list) else value)
    if a.pretrain_only:
        cfg.targets = ()
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.modality_biases:
        print(bias_sweep(config_from_args(args), tuple(args.modality_biases)))
        return 0
    study = Study(config_from_args(args))
    study.run()
    counts = study.counts()
    print()
    print((study.out / "results.md").read_text())
    print("runs: " + "; ".join(f"{stage} " + ", ".join(f"{v} {k}" for k, v in c.items())
                               for stage, c in counts.items()))
    files = [study.out / f for f in ("results.csv", "heated.csv", "results.md", "results.png")]
    print(f"results: {', '.join(str(f) for f in files if f.exists())}")
    print(f"TensorBoard: tensorboard --logdir {study.out}")
    return 0


if __name__ == "__main__":
    sys.exit(fail_cleanly(main))
