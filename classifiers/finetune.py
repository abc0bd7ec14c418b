"""Fine-tuning: a heated model (or a fresh classifier, ``init="scratch"``) trained on clean images of a target task.

This is the paper's second stage. Nothing here knows about masks or policies: the heated-model file
names the architecture, class count, channels and image size, and the target's images are converted
to that channel count and size, so a grayscale 64 px heated model fine-tunes on a folder of colour
JPEGs of any size. The classification layer is replaced when the target's class count differs from
the heated model's (or when ``new_head`` asks), and kept otherwise.

Recipe. The reference code fine-tunes with torchvision's classification reference: SGD with momentum
0.9 and weight decay 1e-4, lr 1e-3, a linear warm-up (7 of 10 epochs), then a StepLR(30) that never
fires in 10 epochs, i.e. a constant rate. We keep SGD with momentum rather than Adam: the paper's
figures come from it, and with one optimiser for every method the comparison changes only the
initialisation. The warm-up is per step, not per epoch, so short runs warm up smoothly: step ``t``
of the first ``W = round(warmup_epochs * steps_per_epoch)`` steps uses ``lr * (s + (1 - s) * t / W)``
with ``s = WARMUP_START`` (torchvision's default start factor); afterwards the rate follows a half cosine
from ``lr`` towards 0 over the remaining steps (``schedule="cosine"``, the default) or stays at ``lr``
(``schedule="constant"``, the paper's). The default warm-up is one epoch, because the paper's 7 would leave a
short run warming up all the way.

The schedule is chosen by a measured sweep (benchmarks/RESULTS.md, "Fine-tuning recipes"): with a constant rate the
last epoch lands wherever the noise puts it, under the cosine decay it ends close to the run's best epoch. The best peak
rate moves with the data and with the start, scratch or heated (benchmarks/RESULTS.md, "Fine-tuning: the rate chosen
from the data"), so by default (``lr="auto"``) a run chooses it from its own data before it trains
(:meth:`Finetuner.search_rate`): each rate of ``AUTO_CANDIDATES`` trains the starting model for a share of the run's
steps (:func:`search_steps`) under the run's schedule compressed to them, and the highest accuracy on the validation
split wins; the test split is never read. The search is deterministic given the seed and leaves no trace: the run that
follows is the one ``lr=<chosen>`` gives. config.json records the rate chosen (``lr``) and the evidence (``lr_search``:
every candidate's validation accuracy and loss, the steps and the seconds), the checkpoints hold it too, and a resumed
run keeps the choice without searching again. A learning-rate range test (Smith 2017; fastai's and Lightning's
``lr_find``) was measured too and chose worse than the fixed rate, so it is not offered. ``lr=None`` is the fixed
``DEFAULT_LR``, which the comparison study keeps (``agents.study``): its runs compare initialisations under one
recipe without a search each, and its run keys stay those of earlier studies. The paper's recipe stays available by
name (``RECIPES["paper"]``, ``scripts/finetune.py --recipe paper``): ``schedule="constant", lr=1e-3,
warmup_epochs=7, epochs=10``.

The run folder holds ``config.json``, TensorBoard events and ``metrics.jsonl`` (``train/*`` every
``log_every`` steps, ``val/*`` after every epoch, and the final evaluation under ``<split>/*``),
``checkpoint.pt`` / ``checkpoint.prev.pt`` (atomic; every ``ckpt_every`` steps and at every epoch end;
model, optimiser, data position, RNG states and the metrics.jsonl offset, so a run killed at any point
and resumed ends with the weights and metrics of an uninterrupted one), ``model.pt`` (the fine-tuned
classifier in the heated-model format; ``meta["image_size"]`` is the size of the images it was trained on, which
``scripts/predict.py`` resizes new images to), the final evaluation's figures ``confusion_matrix.png``,
``roc_curves.png`` and ``reliability.png`` (also in TensorBoard; :mod:`classifiers.figures`) and ``metrics.json``
(the paper's metrics, on synthrad the shortcut metrics, the confusion matrix and the expected calibration error
``ece`` on the test split, or the validation split when there is no test split), written last.
The final model is the one after the last epoch; no checkpoint is selected on the evaluation split.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from classifiers.checkpoint import open_run, run_rng_state, seed_everything, set_run_rng_state, write_checkpoint
from classifiers.data import DataSpec, load_dataset, make_loader
from classifiers.distributed import (
    all_gather_objects,
    all_mean,
    average_buffers,
    barrier,
    init_from_env,
    is_distributed,
    is_main,
    rank,
)
from classifiers.figures import expected_calibration_error, write_figures
from classifiers.heated import load_heated, save_heated
from classifiers.metrics import SCALAR_METRICS, classification_metrics
from classifiers.models import ARCHITECTURES, LinearProbe, build_classifier, replace_head
from classifiers.runlog import RunLogger, ScalarWindow, Throughput, hparams_table, write_json
from classifiers.train import (
    DevicePolicy,
    NonFiniteError,
    Normalizer,
    check_precision,
    predict,
    resolve_device,
    supervised_step,
    with_saved_precision,
)

SCRATCH = "scratch"
SCHEDULES = ("cosine", "constant")
AUTO = "auto"
"""``lr="auto"``, the default: the peak rate is chosen from the data by :meth:`Finetuner.search_rate`."""
DEFAULT_LR = {"scratch": 0.1, "heated": 0.1, "linear_probe": 0.1}
"""The fixed peak rate ``lr=None`` resolves to, by start (the comparison study's; benchmarks/RESULTS.md has the
sweep)."""
AUTO_CANDIDATES = (0.02, 0.05, 0.1, 0.2)
"""The peak rates ``lr="auto"`` tries, lowest first: a factor of 10 around ``DEFAULT_LR``."""
AUTO_SHARE = 0.1
"""Each candidate trains for this share of the run's steps, within ``[AUTO_MIN_STEPS, AUTO_MAX_STEPS]`` and never more
than the run (:func:`search_steps`)."""
AUTO_MIN_STEPS = 80
"""A candidate's fewest steps: shorter trials ranked the rates little better than chance (benchmarks/RESULTS.md)."""
AUTO_MAX_STEPS = 500
"""A candidate's most steps, so that a long run on a large dataset searches at a bounded cost."""
PAPER_LR = 1e-3
"""The reference code's fine-tuning rate, with ``schedule="constant"`` and 7 warm-up epochs of 10."""
RECIPES = {
    "default": {"lr": AUTO, "schedule": "cosine", "warmup_epochs": 1.0, "epochs": 10},
    "paper": {"lr": PAPER_LR, "schedule": "constant", "warmup_epochs": 7.0, "epochs": 10},
}
"""The fine-tuning recipes by name (``scripts/finetune.py --recipe``); ``default`` is :class:`FinetuneConfig`'s."""
WARMUP_START = 0.01
"""The warm-up's first learning rate, as a fraction of ``lr`` (torchvision's ``lr_warmup_decay``)."""
RESUME_FREE = ("device", "workers", "run_dir")
"""Settings a resumed run may change: they do not change what is computed. (``precision`` does: a run records
the resolved one, and resuming keeps it.)"""


@dataclass
class FinetuneConfig:
    """A fine-tuning run: where the weights start, the target data, the schedule and the bookkeeping."""

    init: str = SCRATCH
    """A heated-model file (``heated.pt`` of a pretraining run, or a ``model.pt``), or ``scratch``."""
    dataset: str = "synthrad:unseen"
    """Target dataset specification (see ``classifiers.data``)."""
    classifier: str | None = None
    """Architecture for ``scratch`` (None: smallcnn); with a heated model it must match the file's, if given."""
    image_size: int | None = None
    """Image side in pixels (None: the heated model's; for scratch, the data's own)."""
    channels: int | None = None
    """Scratch only: convert images to this many channels (None: the data's own). A heated model sets it."""
    new_head: bool = False
    """Replace the classification layer even when the class count matches (a different task of as many classes)."""
    linear_probe: bool = False
    """Train a fresh classification layer on frozen features (``classifiers.models.LinearProbe``): what the
    representation holds, unchanged by fine-tuning (implies ``new_head``)."""
    epochs: int = RECIPES["default"]["epochs"]
    """Passes over the (few-shot) training set (the paper: 10)."""
    lr: float | str | None = RECIPES["default"]["lr"]
    """Peak learning rate; ``auto``: chosen from the data by a short sweep judged on the validation split
    (:meth:`Finetuner.search_rate`; config.json records the choice and its evidence); None: the start's fixed
    ``DEFAULT_LR`` (see ``resolved``); the paper: 1e-3."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay."""
    warmup_epochs: float = RECIPES["default"]["warmup_epochs"]
    """Epochs of per-step linear warm-up from ``WARMUP_START * lr`` to ``lr`` (the paper: 7 of 10)."""
    schedule: str = RECIPES["default"]["schedule"]
    """After the warm-up: ``cosine`` (half cosine towards 0) or ``constant`` (the paper's)."""
    batch_size: int = 32
    """Images per step (per process); lowered to the training set's size when that is smaller."""
    train_per_class: int | None = None
    """Few-shot: keep at most this many training images per class, chosen by ``seed`` (None: all)."""
    seed: int = 0
    """Seeds a new head or scratch model, the data order, the augmentation and the few-shot subset."""
    device: str = "auto"
    """auto, cpu or cuda."""
    precision: str = "auto"
    """The model's arithmetic: ``bf16`` autocast, ``fp32`` or ``auto`` (see ``classifiers.train.resolve_precision``)."""
    workers: int | None = 0
    """DataLoader worker processes (None: chosen from the cores, ``classifiers.data.auto_workers``; the scripts'
    default)."""
    run_dir: str = ""
    """Run folder (empty: ``runs/finetune__<init>__<dataset>__s<seed>__<time>``)."""
    log_every: int = 10
    """Steps between training-scalar logs."""
    ckpt_every: int = 100
    """Steps between checkpoints (also written at every epoch end)."""
    eval_batch_size: int = 256
    """Batch size of the evaluation passes."""

    @property
    def scratch(self) -> bool:
        return self.init == SCRATCH

    @property
    def start(self) -> str:
        """What training starts from, as ``DEFAULT_LR`` names it: linear_probe, scratch or heated."""
        return "linear_probe" if self.linear_probe else SCRATCH if self.scratch else "heated"

    @property
    def auto_lr(self) -> bool:
        return self.lr == AUTO

    def resolved(self) -> FinetuneConfig:
        """This config with ``lr=None`` replaced by the start's fixed default rate. ``auto`` stays: the run resolves
        it (config.json records the rate chosen)."""
        return self if self.lr is not None else replace(self, lr=DEFAULT_LR[self.start])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the value and the fix for any setting that cannot work."""
        if not self.scratch and not Path(self.init).is_file():
            raise ValueError(f"--init {self.init}: no such file; give the heated.pt a pretraining run wrote "
                             "(scripts/pretrain.py) or 'scratch'")
        if self.classifier is not None and self.classifier not in ARCHITECTURES:
            raise ValueError(f"unknown classifier {self.classifier!r}; use one of {', '.join(ARCHITECTURES)}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ValueError(f"channels {self.channels} must be 1 (grayscale) or 3 (colour)")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image size {self.image_size} is too small; use 8 or more")
        if self.epochs < 1:
            raise ValueError(f"epochs {self.epochs} must be at least 1")
        if not (self.lr is None or self.lr == AUTO or (isinstance(self.lr, (int, float)) and not isinstance(
                self.lr, bool) and self.lr > 0 and math.isfinite(self.lr))):
            raise ValueError(f"learning rate {self.lr!r} must be a positive number or {AUTO!r} (chosen from the "
                             f"data, the default); the paper fine-tunes with {PAPER_LR}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum {self.momentum} must lie in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay {self.weight_decay} must be 0 or more")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise ValueError(f"warm-up epochs {self.warmup_epochs} must be 0 or more")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ValueError(f"train_per_class {self.train_per_class} must be at least 1 (or None for all images)")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers {self.workers} must be 0 or more (or None: chosen from the cores)")
        check_precision(self.precision)
        for name in ("batch_size", "log_every", "ckpt_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")

    def default_run_dir(self) -> str:
        start = f"scratch-{self.classifier or 'smallcnn'}" if self.scratch else Path(self.init).resolve().parent.name
        data = self.dataset.split("?")[0].replace(":", "-").replace("/", "_")
        shots = f"-k{self.train_per_class}" if self.train_per_class else ""
        return str(Path("runs") / f"finetune__{start}__{data}{shots}__s{self.seed}__{time.strftime('%Y%m%d-%H%M%S')}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        d = {"schedule": "constant"} | with_saved_precision(d)  # runs saved before the setting ran at a constant rate
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """The learning rate of the 0-based ``step``: linear warm-up, then constant or half-cosine (see the module)."""
    if step < warmup_steps:
        return lr * (WARMUP_START + (1.0 - WARMUP_START) * step / warmup_steps)
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def search_steps(total_steps: int) -> int:
    """The steps each candidate of ``lr="auto"`` trains in a run of ``total_steps``: ``AUTO_SHARE`` of them, within
    ``[AUTO_MIN_STEPS, AUTO_MAX_STEPS]`` and at most the run's own."""
    return min(total_steps, max(AUTO_MIN_STEPS, min(AUTO_MAX_STEPS, math.ceil(AUTO_SHARE * total_steps))))


def _agreed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy, non-finite on every process when it is on any: under torch.distributed a candidate
    rate that diverges then stops on all processes at the same step instead of leaving the others waiting."""
    per_image = F.cross_entropy(logits, labels, reduction="none")
    if is_distributed() and all_mean(torch.isfinite(per_image).all().float()).item() < 1:
        return per_image + float("nan")
    return per_image


def initial_model(cfg: FinetuneConfig) -> tuple[nn.Module | None, dict[str, Any]]:
    """The model fine-tuning starts from, and what the data must be converted to.

    Returns the model and ``{"arch", "num_classes", "in_channels", "image_size", "class_names"}``; for
    scratch the model is None (it is built once the data is known) and the sizes are the config's.
    """
    if cfg.scratch:
        return None, {"arch": cfg.classifier or "smallcnn", "num_classes": None, "in_channels": cfg.channels,
                      "image_size": cfg.image_size, "class_names": []}
    model, info = load_heated(cfg.init)
    if cfg.classifier is not None and cfg.classifier != info["arch"]:
        raise ValueError(f"--init {cfg.init} holds a {info['arch']} but --classifier {cfg.classifier} was asked for; "
                         f"drop --classifier or give a {cfg.classifier} heated model")
    if cfg.channels is not None and cfg.channels != info["in_channels"]:
        raise ValueError(f"--init {cfg.init} takes {info['in_channels']}-channel images but channels={cfg.channels} "
                         "was asked for; the heated model decides the channels, drop the option")
    return model, info


def fit_head(model: nn.Module | None, info: dict[str, Any], data: DataSpec, cfg: FinetuneConfig
             ) -> tuple[nn.Module, str]:
    """Build the scratch model, or fit the heated model's head to the target; return it and ``new``, ``replaced``
    or ``kept``."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_classifier(info["arch"], data.num_classes, data.in_channels, data.image_size)
        return model, "new"
    if replace_head(model, data.num_classes, force=cfg.new_head or cfg.linear_probe):
        return model, "replaced"
    if info["class_names"] and info["class_names"] != data.class_names:
        warnings.warn(f"the heated model's head is kept (both have {data.num_classes} classes) although the class "
                      f"names differ ({info['class_names'][:3]}... vs {data.class_names[:3]}...); pass --new-head "
                      "if the target is another task", stacklevel=2)
    return model, "kept"


class Finetuner:
    """Owns a fine-tuning run: model, data, optimiser, logs and checkpoints. See the module docstring."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = False) -> None:
        cfg.validate()
        cfg = cfg.resolved()
        init_from_env(cfg.device)
        self.main = is_main()
        self.run_dir = Path(cfg.run_dir or cfg.default_run_dir())
        state = open_run(self.run_dir, resume, "model", self.main)
        saved = FinetuneConfig.from_dict(state["config"]) if state is not None else None
        if saved is not None and cfg.precision == "auto":
            cfg = replace(cfg, precision=saved.precision)  # a resumed run keeps its arithmetic, on any machine
        self.lr_search: dict[str, Any] | None = state.get("lr_search") if state is not None else None
        if saved is not None and cfg.auto_lr and self.lr_search is not None:
            cfg = replace(cfg, lr=saved.lr)  # the rate its search chose: a resumed run does not search again
        self.dev = DevicePolicy(resolve_device(cfg.device), cfg.precision)
        self.dev.require_same_on_all_ranks()
        cfg = replace(cfg, precision=self.dev.precision)  # resolved: config.json and the checkpoints say what ran
        if saved is not None:
            _check_same_config(saved, cfg, self.run_dir)
        start, info = initial_model(cfg)
        self.cfg = cfg
        self.data = load_dataset(cfg.dataset, image_size=cfg.image_size or info["image_size"],
                                 channels=info["in_channels"], train_per_class=cfg.train_per_class, seed=cfg.seed)
        model, self.head = fit_head(start, info, self.data, cfg)
        self.arch = info["arch"]
        self.arch_image_size = info["image_size"] or self.data.image_size
        self.model = self.dev.prepare(LinearProbe(model) if cfg.linear_probe else model)
        self.net: nn.Module = self.model
        if is_distributed():
            ids = [self.dev.device.index] if self.dev.cuda else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        world = dist.get_world_size() if is_distributed() else 1
        n_train = len(self.data.splits["train"])
        self.batch_size = max(1, min(cfg.batch_size, n_train // world))
        if self.batch_size < cfg.batch_size and self.main:
            warnings.warn(f"the training set of {self.data.name} has {n_train} images; batch size lowered from "
                          f"{cfg.batch_size} to {self.batch_size}", stacklevel=2)
        self.world = world
        self.loader = make_loader(self.data, "train", self.batch_size, train=True, seed=cfg.seed, workers=cfg.workers,
                                  pin_memory=self.dev.cuda, rank=rank(), num_replicas=world)
        self.val_loader = make_loader(self.data, "val", cfg.eval_batch_size, train=False)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = min(self.total_steps, round(cfg.warmup_epochs * self.steps_per_epoch))
        self.normalizer = Normalizer()
        if cfg.auto_lr:
            self.lr_search = self.search_rate()
            cfg = self.cfg = replace(cfg, lr=self.lr_search["chosen"])
        self.eval_split = self.data.eval_split
        self.eval_loader = (self.val_loader if self.eval_split == "val"
                            else make_loader(self.data, self.eval_split, cfg.eval_batch_size, train=False))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.global_step, self.epoch = state["global_step"], state["epoch"]
            self.step_in_epoch = state["step_in_epoch"]
            set_run_rng_state(state["rng"], cfg.seed, self.global_step)
            self.logger = RunLogger(self.run_dir, self.main, purge_step=self.global_step + 1,
                                    resume_offset=state["metrics_offset"])
        else:
            seed_everything(cfg.seed)
            self.logger = RunLogger(self.run_dir, self.main)
            if self.main:
                searched = {"lr_search": self.lr_search} if self.lr_search is not None else {}
                write_json(self.run_dir / "config.json", asdict(cfg) | searched)
                self.logger.text("hyperparameters", hparams_table(
                    asdict(cfg) | {"head": self.head, "arch": self.arch, "train_images": n_train,
                                   "effective_batch_size": self.batch_size * world,
                                   "resolved_device": str(self.dev.device)}
                    | ({"lr_search": self.lr_search["why"]} if self.lr_search is not None else {})))
        self.window = ScalarWindow()
        self.throughput = Throughput()
        self.pbar: tqdm | None = None

    def search_rate(self, candidates: tuple[float, ...] | None = None, steps: int | None = None) -> dict[str, Any]:
        """Choose the peak learning rate from the data (``lr="auto"``); return the record config.json keeps.

        Every rate of ``candidates`` (default: ``AUTO_CANDIDATES``) trains the starting model for the same ``steps``
        (default: :func:`search_steps` of the run) on the training split, in the run's own order and augmentation,
        under the run's schedule compressed to those steps (the same warm-up share, then the cosine decay to 0 or
        the constant rate). Each is then scored on the validation split; the highest accuracy wins, ties going to
        the lower validation loss. A rate whose training loss turns non-finite is out. The test split is never read.
        Afterwards the model (BatchNorm statistics included) and the loaders' generators are as they were, so the
        run that follows trains exactly as one given the chosen rate does.

        The record: ``chosen``, ``why`` (one line, also printed), ``rule``, ``split``, ``steps_per_candidate``,
        ``run_steps``, ``candidates`` (``lr``, ``val_accuracy``, ``val_loss``, ``diverged`` each) and ``seconds``.
        """
        started = time.perf_counter()
        candidates = candidates or AUTO_CANDIDATES
        steps = steps or search_steps(self.total_steps)
        warmup = round(steps * self.warmup_steps / self.total_steps)
        start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        generators = [loader.generator.get_state() for loader in (self.loader, self.val_loader)]
        scores = []
        bar = tqdm(total=len(candidates) * steps, disable=not self.main, desc="lr auto", unit="step",
                   dynamic_ncols=True)
        for lr in candidates:
            self.model.load_state_dict(start)
            optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=self.cfg.momentum,
                                        weight_decay=self.cfg.weight_decay)
            diverged = False
            for step, (images, labels) in enumerate(itertools.islice(self.training_batches(), steps)):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, lr, warmup, steps, self.cfg.schedule)
                images, labels = self.dev.batch(images, labels)
                try:
                    supervised_step(self.net, optimizer, self.normalizer(images), labels, self.dev, step=step + 1,
                                    criterion=_agreed_cross_entropy)
                except NonFiniteError:
                    diverged = True
                    bar.update(steps - step)
                    break
                bar.update(1)
            average_buffers(self.model)
            score = {"lr": lr, "val_accuracy": None, "val_loss": None, "diverged": diverged}
            if self.main and not diverged:
                probs, truth, loss = predict(self.model, self.val_loader, self.dev, self.normalizer)
                score |= {"val_accuracy": float((probs.argmax(1) == truth).mean()), "val_loss": loss,
                          "diverged": not math.isfinite(loss)}
            scores.append(score)
        bar.close()
        self.model.load_state_dict(start)
        for loader, state in zip((self.loader, self.val_loader), generators):
            loader.generator.set_state(state)
        scores = all_gather_objects(scores)[0]  # the main process's scores decide, on every process
        usable = [s for s in scores if not s["diverged"]]
        if not usable:
            raise ValueError(f"every candidate rate of lr auto ({', '.join(map(str, candidates))}) diverged on "
                             f"{self.data.name}; give a lower rate with --lr")
        best = max(usable, key=lambda s: (s["val_accuracy"], -s["val_loss"]))
        tried = ", ".join(f"{s['lr']:g}: " + ("diverged" if s["diverged"] else f"{s['val_accuracy']:.3f}")
                          for s in scores)
        seconds = all_gather_objects(time.perf_counter() - started)[0]
        why = (f"lr auto chose {best['lr']:g}: the highest validation accuracy after {steps} steps per candidate "
               f"({tried}; {seconds:.1f} s)")
        if self.main:
            tqdm.write(why)
        return {"chosen": best["lr"], "why": why, "split": "val", "steps_per_candidate": steps,
                "run_steps": self.total_steps, "rule": "highest validation accuracy after a compressed run per "
                "candidate; ties: lower validation loss", "candidates": scores, "seconds": seconds}

    def training_batches(self):
        """The training loader's batches, epoch after epoch, from the run's first epoch on (what the search trains
        on)."""
        for epoch in itertools.count():
            self.loader.sampler.set_epoch(epoch)
            yield from self.loader

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One SGD step on a clean batch at the scheduled learning rate; log, checkpoint."""
        lr = lr_at(self.global_step, self.cfg.lr, self.warmup_steps, self.total_steps, self.cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, labels = self.dev.batch(images, labels)
        loss, logits = supervised_step(self.net, self.optimizer, self.normalizer(images), labels, self.dev,
                                       step=self.global_step + 1)
        self.global_step += 1
        self.step_in_epoch += 1
        self.window.add({"train/loss": loss.mean(), "train/accuracy": (logits.argmax(1) == labels).float().mean(),
                         "train/lr": lr})
        if self.pbar is not None:
            self.pbar.update(1)
        checkpoint = self.global_step % self.cfg.ckpt_every == 0 and self.step_in_epoch < self.steps_per_epoch
        # Windows close at every checkpoint, so a resumed run logs what an uninterrupted one does.
        with self.window.paused():
            if self.global_step % self.cfg.log_every == 0 or checkpoint or self.step_in_epoch == self.steps_per_epoch:
                self.log_window()
            if checkpoint:
                self.save_checkpoint()

    def log_window(self) -> None:
        means = {k: all_mean(v.to(self.dev.device)).item() for k, v in self.window.means().items()}
        means |= self.throughput.close(self.window, self.window.steps * self.batch_size * self.world)
        means["train/epoch"] = float(self.epoch)
        self.logger.scalars(self.global_step, means)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{means['train/loss']:.3f}", acc=f"{means['train/accuracy']:.3f}")
        self.window.reset()

    def evaluate_split(self, split: str, log: bool = True) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """The paper's metrics on ``split`` (main process only), logged under ``<split>/`` unless ``log`` is False,
        with the labels and predicted probabilities they come from."""
        loader = self.val_loader if split == "val" else self.eval_loader
        probs, labels, loss = predict(self.model, loader, self.dev, self.normalizer)
        metrics = {"loss": loss, **classification_metrics(labels, probs, self.data.shortcut_agreement(split))}
        if log:
            self.logger.scalars(self.global_step, {f"{split}/{k}": float(metrics[k]) for k in SCALAR_METRICS
                                                   if k in metrics})
        return metrics, labels, probs

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (the previous one is kept as ``checkpoint.prev.pt``)."""
        average_buffers(self.model)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "rng": run_rng_state(),
            "config": asdict(self.cfg),
            "lr_search": self.lr_search,
            "metrics_offset": self.logger.offset(),
        }
        if self.main:
            write_checkpoint(self.run_dir, state)
        barrier()

    def run(self) -> Path:
        """Train to the end; write ``model.pt`` and then ``metrics.json``; return the run folder."""
        self.pbar = tqdm(total=self.total_steps, initial=self.global_step, disable=not self.main,
                         desc=f"finetune {Path(self.cfg.init).parent.name or self.cfg.init} ({self.dev.precision})",
                         unit="step",
                         dynamic_ncols=True)
        self.window.reset()  # the clocks start with the steps
        self.throughput = Throughput()
        try:
            while self.epoch < self.cfg.epochs:
                self.loader.sampler.set_epoch(self.epoch, self.step_in_epoch * self.batch_size)
                for images, labels in self.loader:
                    self.train_step(images, labels)
                with self.window.paused():
                    average_buffers(self.model)
                    if self.main:
                        self.evaluate_split("val")
                    barrier()
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    self.save_checkpoint()
            if self.main:
                self.finish()
        finally:
            self.pbar.close()
            self.pbar = None
            self.logger.close()
        barrier()
        return self.run_dir

    def finish(self) -> None:
        """Evaluate on the test split (val when there is none; its scalars were logged at the last epoch end); write
        the model, the evaluation's figures (:mod:`classifiers.figures`) and, last, ``metrics.json``."""
        metrics, labels, probs = self.evaluate_split(self.eval_split, log=self.eval_split != "val")
        save_heated(self.run_dir / "model.pt", self.model, self.arch, self.data.num_classes, self.data.in_channels,
                    self.arch_image_size, self.data.class_names,
                    meta={"init": self.cfg.init, "dataset": self.cfg.dataset, "steps": self.global_step,
                          "image_size": self.data.image_size})
        write_figures(self.run_dir, labels, probs, self.data.class_names, self.logger, self.global_step,
                      self.eval_split)
        write_json(self.run_dir / "metrics.json", {
            **metrics, "ece": expected_calibration_error(labels, probs), "split": self.eval_split,
            "num_images": len(self.data.splits[self.eval_split]),
            "class_names": self.data.class_names, "head": self.head, "init": self.cfg.init,
            "dataset": self.data.name, "train_images": len(self.data.splits["train"]), "steps": self.global_step,
        })


def _check_same_config(saved: FinetuneConfig, given: FinetuneConfig, run_dir: Path) -> None:
    diffs = [f"{f.name}={getattr(saved, f.name)!r} (now {getattr(given, f.name)!r})" for f in fields(FinetuneConfig)
             if f.name not in RESUME_FREE and getattr(saved, f.name) != getattr(given, f.name)]
    if diffs:
        raise ValueError(f"run folder {run_dir} was started with {', '.join(diffs)}; resume with the same settings "
                         "(see its config.json) or choose another --run-dir")


def finetune(cfg: FinetuneConfig, resume: bool = False) -> Path:
    """Run (or resume) one fine-tuning run; return its folder (``metrics.json`` holds the results)."""
    return Finetuner(cfg, resume=resume).run()
