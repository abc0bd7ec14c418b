"""Launched by tests/test_distributed.py under torchrun (or alone): writes each rank's results to OUT."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from agents.reinforce import Reinforce
from agents.runner import PretrainConfig, PretrainRunner
from classifiers import finetune as finetune_module
from classifiers.data import DataSpec, ImageSource
from classifiers.distributed import init_from_env, rank, shutdown
from classifiers.finetune import FinetuneConfig, Finetuner
from envs.core import EnvConfig, PretrainCore, StepResult


def tiny_data(n: int = 64, size: int = 16) -> DataSpec:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    labels = (np.arange(n) % 2).astype(np.int64)
    splits = {s: ImageSource(labels=labels, images=images) for s in ("train", "val")}
    return DataSpec("tiny", ["a", "b"], 1, size, splits)


def pretrain(out: Path, run_dir: str) -> None:
    """A short reinforce pretraining; every rank saves its classifier and policy weights."""
    cfg = PretrainConfig(algo="reinforce", env=EnvConfig(dataset="synthrad?n_train=256&n_val=32&n_test=32",
                                                         batch_size=8, image_size=32, grid=8, device="cpu"),
                         max_steps=6, run_dir=run_dir, log_every=2, image_every=2, ckpt_every=3)
    runner = PretrainRunner(cfg)
    runner.run()
    torch.save({"classifier": runner.core.classifier.state_dict(), "policy": runner.agent.policy.state_dict()},
               out / f"rank{rank()}.pt")


def streams_config(run_dir: str) -> PretrainConfig:
    return PretrainConfig(algo="reinforce", env=EnvConfig(dataset="synthrad?n_train=256&n_val=32&n_test=32",
                                                          batch_size=8, image_size=32, grid=8, device="cpu"),
                          max_steps=6, run_dir=run_dir)


def random_streams(out: Path, run_dir: str) -> None:
    """Each rank's next random draws after a fresh start, after a checkpoint, and after resuming from it."""
    cfg = streams_config(run_dir)
    runner = PretrainRunner(cfg)
    first = torch.rand(8)
    runner.save_checkpoint()
    after_checkpoint = torch.rand(8)
    torch.manual_seed(12345)  # anything: resuming must restore this rank's own state
    PretrainRunner(cfg, resume=True)
    resumed = torch.rand(8)
    torch.save({"first": first, "after_checkpoint": after_checkpoint, "resumed": resumed}, out / f"rank{rank()}.pt")


def resumed_draws(out: Path, run_dir: str) -> None:
    """Each rank's first random draws after resuming ``run_dir`` (written by another number of processes)."""
    PretrainRunner(streams_config(run_dir), resume=True)
    torch.save({"resumed": torch.rand(8)}, out / f"rank{rank()}.pt")


def finetune(out: Path, run_dir: str) -> None:
    """A short fine-tuning from scratch; every rank saves its model weights."""
    data = "synthrad:unseen?n_train=192&n_val=24&n_test=24"
    cfg = FinetuneConfig(init="scratch", classifier="smallcnn", dataset=data, image_size=32, epochs=1, lr=0.01,
                         batch_size=8, device="cpu", run_dir=run_dir, log_every=2, ckpt_every=5)
    tuner = Finetuner(cfg)
    tuner.run()
    torch.save({"model": tuner.model.state_dict()}, out / f"rank{rank()}.pt")


def finetune_auto(out: Path, run_dir: str) -> None:
    """A fine-tuning run whose rate is chosen (lr auto) among one that trains and one that diverges; every rank saves
    the record of the choice and its model weights."""
    finetune_module.AUTO_CANDIDATES = (0.05, 1e9)
    data = "synthrad:unseen?n_train=96&n_val=24&n_test=24"
    cfg = FinetuneConfig(init="scratch", classifier="smallcnn", dataset=data, image_size=16, epochs=1, lr="auto",
                         batch_size=8, device="cpu", run_dir=run_dir)
    tuner = Finetuner(cfg)
    tuner.run()
    torch.save({"model": tuner.model.state_dict(), "chosen": tuner.cfg.lr,
                "diverged": [c["diverged"] for c in tuner.lr_search["candidates"]]}, out / f"rank{rank()}.pt")


def equivalence(out: Path, global_batch: int) -> None:
    """Three REINFORCE updates on fixed masks and rewards for one global batch, split over the ranks."""
    rk, world = init_from_env("cpu")
    torch.manual_seed(0)
    core = PretrainCore(EnvConfig(batch_size=global_batch // world, image_size=16, grid=4, blur_kernel=1,
                                  device="cpu"), data=tiny_data())
    torch.manual_seed(1)
    agent = Reinforce(normalize_advantage=True, entropy_coef=0.01)
    agent.bind(core, total_steps=10)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        images = torch.randint(0, 256, (global_batch, 1, 16, 16), dtype=torch.uint8, generator=g)
        grid = torch.rand(global_batch, 4, 4, generator=g).clamp(0.01, 0.99)
        reward = torch.randn(global_batch, generator=g)
        loss = torch.rand(global_batch, generator=g)
        local = slice(rk, None, world)  # the sampler's sharding: rank r takes every world-th image
        agent.act(images[local])
        agent._grid = grid[local]
        agent.observe(StepResult(reward=reward[local], loss=loss[local], correct=torch.zeros(global_batch)[local],
                                 truncated=False))
    result = {"policy": agent.policy.state_dict(), "baseline": agent.baseline.clone()}
    torch.save(result, out / f"eq{world}-rank{rk}.pt")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    try:
        if mode == "pretrain":
            pretrain(out, sys.argv[3])
        elif mode == "finetune":
            finetune(out, sys.argv[3])
        elif mode == "finetune_auto":
            finetune_auto(out, sys.argv[3])
        elif mode == "random_streams":
            random_streams(out, sys.argv[3])
        elif mode == "resumed_draws":
            resumed_draws(out, sys.argv[3])
        else:
            equivalence(out, int(sys.argv[3]))
    finally:
        shutdown()
