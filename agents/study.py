"""The comparison study: does pretraining with a noise mask give a better starting point than ordinary training?

For every method, seed and target task:

- a pretraining method (an ``--algo`` name of ``agents.registry``: ``none``, ``uniform-mask``,
  ``gaussian-noise``, ``reinforce``, ``reinforce-official``, ``ppo``, ...) pretrains a classifier on the
  pretraining task (``agents.runner.pretrain``; one run per method and seed, shared by every target),
  and the heated model is fine-tuned on the target (``classifiers.finetune``);
- ``scratch`` trains a fresh classifier on the target with the same fine-tuning recipe (by default a cosine
  decay from the start's default rate, ``classifiers.finetune.DEFAULT_LR``, chosen by a measured sweep for
  scratch and heated starts alike), so "heated against scratch" compares two well-trained models.

A target is a dataset specification, optionally followed by ``@K`` for a few-shot variant with K
training images per class (``synthrad:unseen@10``), and optionally preceded by ``linear:`` for a linear probe: a
fresh head trained on the frozen features at ``probe_lr``, which reads the representation itself, where full
fine-tuning on a biased task can erase any difference (``linear:synthrad:shifted``). Runs are paired by seed: seed s
fixes the classifier's initialisation and data order in pretraining, and the head, data order, augmentation
and few-shot subset in fine-tuning, for every method alike. ``results.md`` therefore reports, beside
the mean and standard deviation over seeds, the mean over seeds of the paired difference to ``none``
(ordinary pretraining) with a 95% confidence interval from the t distribution with n - 1 degrees of
freedom; its summary table marks the differences that stand at a false-discovery rate of 5% over all of its
paired t-tests (Benjamini-Hochberg), since some of many 95% intervals exclude 0 by chance.

The output folder holds ``pretrain/<method>__s<seed>__<key>/`` and
``finetune/<target>/<method>__s<seed>__<key>/`` run folders, where ``<key>`` is a hash of the run's
settings, and ``study.json`` (the settings and run list), ``results.csv`` (one row per fine-tuning run),
``results.md`` and ``results.png``. Rerun with the same settings, the study reuses every finished run
(``heated.pt`` or ``metrics.json`` present with a matching ``config.json``) and resumes unfinished runs
from their checkpoints; changed settings, including a changed default of an agent's options, make new runs
beside the old ones (a change of fine-tuning
settings alone reuses the pretraining runs). The classifiers' precision is part of every run's key, resolved
(``auto`` becomes bf16 or fp32 once per study), so a study never mixes runs in different arithmetic; study
folders written before the setting existed are therefore run afresh.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.registry import AGENTS, algo_names, make_agent
from agents.runner import PretrainConfig, pretrain
from classifiers.finetune import DEFAULT_LR, RESUME_FREE, SCRATCH, FinetuneConfig, finetune
from classifiers.metrics import GROUP_NAMES, MARKER_NAMES, METRIC_NAMES, SHORTCUT_NAMES, WORST_GROUP
from classifiers.runlog import write_json
from classifiers.synthrad import TASKS
from classifiers.train import resolve_device, resolve_precision
from envs.core import EnvConfig

BASELINE = "none"
DEFAULT_METHODS = ("none", "uniform-mask", "gaussian-noise", "random-erasing", "trivial-augment", "reinforce",
                   "reinforce-official-scaled", "none-scaled", "reinforce-budget", SCRATCH)
"""The full study: plain training; non-learned perturbations (the uniform mask, Gaussian noise, and the augmentations a
practitioner would reach for instead, torchvision's RandomErasing and TrivialAugmentWide); the paper's REINFORCE; the
reference recipe whole (its objective and loss scale) with its plain-training control at the same loss scale; the
budgeted policy that decides where the noise goes; and training from scratch on the target."""
QUICK_METHODS = ("none", "uniform-mask", "random-erasing", "reinforce", "reinforce-budget", SCRATCH)
"""The quick study's methods (``make demo``): one of each kind, within its 10 minutes."""
BALANCED_BIAS = 0.3333
"""The modality bias of the default modality-balanced target: the preferred modality no more often than another."""
PRETRAIN_FREE = ("run_dir", "device", "workers")
"""Settings that do not change what a pretraining run computes (left out of its key). The precision is in the key,
resolved (:class:`Study` resolves ``auto`` once), so runs in another arithmetic are never reused."""


@dataclass
class StudyConfig:
    """The comparison study's settings (see the module docstring)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    """Pretraining methods (registry names) and ``scratch``."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One paired run of every method per seed."""
    pretrain_dataset: str = "synthrad"
    """The pretraining task."""
    targets: tuple[str, ...] | None = None
    """Target tasks, ``[linear:]DATASET[@K]`` (None: the pretraining task and a few-shot variant; for synthrad, with
    the pretraining task's options: the pretraining task, its modality-shifted test split, the unseen task in full
    and with ``fewshot_k`` images per class, a linear probe tested on the shifted split, and fine-tuning on
    modality-balanced data (``modality_bias`` 1/3); empty: pretraining only)."""
    fewshot_k: int = 10
    """K of the default few-shot target."""
    classifier: str = "smallcnn"
    """Classifier architecture."""
    image_size: int = 64
    """Image side in pixels, for pretraining and fine-tuning alike."""
    batch_size: int = 32
    """Images per step."""
    grid: int = 16
    """Noise-mask grid side G."""
    blur_kernel: int = 13
    """Mask blur kernel size."""
    blur_sigma: float = 6.0
    """Mask blur sigma in pixels."""
    mask_op: str = "multiply"
    """How every method's mask acts: ``multiply`` or ``blend`` (``envs.core.EnvConfig.mask_op``); a method that
    registers its own operator (``uniform-blend``) keeps it."""
    pretrain_lr: float = 0.1
    """Pretraining SGD learning rate; StepLR divides it by 10 at each third of the epochs (the paper: 30 of 90)."""
    pretrain_epochs: int = 10
    """Pretraining epochs."""
    pretrain_steps: int | None = None
    """Stop pretraining after this many steps (None: after ``pretrain_epochs``)."""
    finetune_epochs: int = 10
    """Fine-tuning epochs (the paper: 10)."""
    fewshot_epochs: int | None = None
    """Fine-tuning epochs on few-shot targets (None: ``finetune_epochs``)."""
    finetune_lr: float | None = None
    """Fine-tuning learning rate of heated models (None: ``DEFAULT_LR["heated"]``; the paper: 1e-3)."""
    scratch_lr: float | None = None
    """Learning rate of the ``scratch`` baseline (None: ``DEFAULT_LR["scratch"]``)."""
    probe_lr: float | None = None
    """Learning rate of linear probes (``linear:`` targets; None: ``DEFAULT_LR["linear_probe"]``)."""
    finetune_schedule: str = "cosine"
    """Fine-tuning rate after the warm-up, for every start: ``cosine`` or ``constant`` (the paper's)."""
    warmup_epochs: float = 1.0
    """Fine-tuning warm-up epochs (the paper: 7 of 10)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    precision: str = "auto"
    """The classifiers' arithmetic: bf16, fp32 or auto (see ``classifiers.train.resolve_precision``)."""
    workers: int = 0
    """DataLoader worker processes."""
    threads: int | None = None
    """PyTorch CPU threads (None: PyTorch's default, one per core)."""
    out: str = "runs/study"
    """Output folder."""

    @classmethod
    def quick(cls) -> StudyConfig:
        """The small study ``make demo`` runs, a few minutes on 2 CPU cores: half-size images (so half the grid
        and blur), a few hundred steps per run, and the default fine-tuning recipe (``FinetuneConfig``: a cosine
        decay from 0.1; the paper's constant 1e-3 barely moves a fine-tune of a few dozen steps). One CPU thread:
        32 px batches gain little from a second one, and on a busy machine OpenMP's spinning threads made
        them about eight times slower (measured: 70 s against 8 s per pretraining run). The second core then
        takes the REINFORCE agents' policy updates, beside the classifier's step (``agents.reinforce.spare_core``)."""
        options = "n_val=120&n_test=240"
        return cls(
            methods=QUICK_METHODS, seeds=(0, 1, 2), pretrain_dataset=f"synthrad?n_train=1280&{options}",
            targets=(f"synthrad?n_train=1280&{options}", f"synthrad:unseen?n_train=480&{options}",
                     f"synthrad:unseen?n_train=480&{options}@16"),
            image_size=32, grid=8, blur_kernel=7, blur_sigma=3.0, pretrain_epochs=3, finetune_epochs=2,
            fewshot_epochs=10, warmup_epochs=0.5, threads=1, out="runs/study-quick",
        )

    def resolved_targets(self) -> tuple[str, ...]:
        if self.targets is not None:
            return tuple(self.targets)
        base, _, options = self.pretrain_dataset.partition("?")
        if not base.startswith("synthrad"):
            return (self.pretrain_dataset, f"{self.pretrain_dataset}@{self.fewshot_k}")
        query = f"?{options}" if options else ""
        unseen, shifted = "synthrad:unseen" + query, "synthrad:shifted" + query
        targets = (self.pretrain_dataset, shifted, unseen, f"{unseen}@{self.fewshot_k}", LINEAR + shifted)
        balanced = balanced_target(self.pretrain_dataset)
        return targets if balanced == self.pretrain_dataset else (*targets, balanced)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the value and the fix before any run starts."""
        known = set(AGENTS) | {SCRATCH}
        for m in self.methods:
            if m not in known:
                raise ValueError(f"unknown method {m!r}; use any of {', '.join(algo_names())} and {SCRATCH}")
        if not self.methods:
            raise ValueError("no methods given; name at least one, e.g. --methods none reinforce")
        if len(set(self.methods)) != len(self.methods) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"methods {list(self.methods)} and seeds {list(self.seeds)} must not repeat")
        if not self.seeds:
            raise ValueError("no seeds given; name at least one, e.g. --seeds 0 1 2")
        targets = self.resolved_targets()
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets {list(targets)} must be given once each")
        if not targets and SCRATCH in self.methods:
            raise ValueError(f"{SCRATCH} trains on a target, and none is given; drop {SCRATCH} or name a target")
        for t in targets:
            parse_target(t)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads {self.threads} must be at least 1 (or left unset for PyTorch's default)")
        if self.fewshot_epochs is not None and self.fewshot_epochs < 1:
            raise ValueError(f"fewshot_epochs {self.fewshot_epochs} must be at least 1")
        self.pretrain_config("none", self.seeds[0], Path(self.out)).validate()
        for t in targets:
            for lr in (self.finetune_lr, self.scratch_lr, self.probe_lr):
                replace(self.finetune_config(SCRATCH, t, self.seeds[0]), lr=lr).validate()  # None: the default

    def pretrain_config(self, method: str, seed: int, run_dir: Path) -> PretrainConfig:
        env = EnvConfig(dataset=self.pretrain_dataset, classifier=self.classifier, batch_size=self.batch_size,
                        image_size=self.image_size, grid=self.grid, blur_kernel=self.blur_kernel,
                        blur_sigma=self.blur_sigma, mask_op=self.mask_op, lr=self.pretrain_lr,
                        lr_step_epochs=max(1, round(self.pretrain_epochs / 3)), seed=seed, device=self.device,
                        precision=self.precision, workers=self.workers)
        return PretrainConfig(algo=method, env=env, epochs=self.pretrain_epochs, max_steps=self.pretrain_steps,
                              run_dir=str(run_dir))

    def finetune_config(self, init: str, target: str, seed: int) -> FinetuneConfig:
        """The fine-tuning run of ``init`` (a heated.pt or ``scratch``) on ``target``; its run_dir is left empty.

        Scratch models see the images as the heated models do: for a synthrad pretraining task, grayscale.
        """
        dataset, k = parse_target(target)
        scratch = init == SCRATCH
        grayscale = scratch and self.pretrain_dataset.startswith("synthrad")
        return FinetuneConfig(
            init=init, dataset=dataset, classifier=self.classifier if scratch else None,
            image_size=self.image_size, channels=1 if grayscale else None,
            epochs=self.fewshot_epochs if k and self.fewshot_epochs else self.finetune_epochs,
            lr=self.probe_lr if is_linear(target) else self.scratch_lr if scratch else self.finetune_lr,
            linear_probe=is_linear(target), warmup_epochs=self.warmup_epochs, schedule=self.finetune_schedule,
            batch_size=self.batch_size, train_per_class=k, seed=seed, device=self.device, precision=self.precision,
            workers=self.workers).resolved()

    def finetune_rates(self) -> dict[str, float]:
        """The peak fine-tuning rate of each start, defaults resolved (for the results' description)."""
        chosen = {"heated": self.finetune_lr, SCRATCH: self.scratch_lr, "linear_probe": self.probe_lr}
        return {start: DEFAULT_LR[start] if lr is None else lr for start, lr in chosen.items()}


LINEAR = "linear:"
"""Prefix of a target evaluated by a linear probe on frozen features (``linear:synthrad:shifted``)."""


def is_linear(target: str) -> bool:
    return target.startswith(LINEAR)


def parse_target(target: str) -> tuple[str, int | None]:
    """Split ``[linear:]DATASET@K`` into the dataset specification and K (None without ``@K``)."""
    dataset, sep, k = target.removeprefix(LINEAR).rpartition("@")
    if not sep:
        return target.removeprefix(LINEAR), None
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"target {target!r}: after '@' comes the number of training images per class "
                         "(a positive integer), e.g. synthrad:unseen@10")
    return dataset, int(k)


def _option(dataset: str, key: str) -> str | None:
    """The generator option ``key`` of a dataset specification, if it sets one."""
    options = dict(o.partition("=")[::2] for o in dataset.partition("?")[2].split("&") if o)
    return options.get(key)


def _bias_option(dataset: str) -> str | None:
    """The ``modality_bias`` option of a dataset specification, if it sets one (it changes the task's data)."""
    return _option(dataset, "modality_bias")


LABELLED_OPTIONS = ("shortcut", "modality_bias", "marker_bias")
"""The generator options a target's label names: they change what the task's shortcut is."""


def target_label(target: str) -> str:
    """A short, readable name for a target: the dataset without its options (but its shortcut and biases), and K."""
    dataset, k = parse_target(target)
    named = [f"{key} {_option(dataset, key)}" for key in LABELLED_OPTIONS if _option(dataset, key) is not None]
    return (dataset.split("?")[0] + (f" ({', '.join(named)})" if named else "") + (f" (K={k})" if k else "")
            + (", linear probe" if is_linear(target) else ""))


def balanced_target(dataset: str) -> str:
    """A synthrad dataset with its shortcuts made uninformative: ``modality_bias`` 1/3 and, with a marker,
    ``marker_bias`` 1 / classes (the marker spells a random class); ``dataset`` itself when it is balanced already."""
    balanced = dataset
    bias = _bias_option(dataset)
    if bias is None or not math.isclose(float(bias), BALANCED_BIAS, abs_tol=1e-3):
        balanced = with_synthrad_option(balanced, "modality_bias", BALANCED_BIAS)
    if _option(dataset, "shortcut") in ("marker", "both"):
        task = dataset.split("?")[0].partition(":")[2] or "pretrain"
        spec = TASKS["pretrain" if task == "shifted" else task]
        chance = round(1 / (len(spec["anatomies"]) * len(spec["lesions"])), 4)
        marker = _option(dataset, "marker_bias")
        if marker is None or not math.isclose(float(marker), chance, abs_tol=1e-3):
            balanced = with_synthrad_option(balanced, "marker_bias", chance)
    return balanced


def target_folder(target: str) -> str:
    """The target's folder name under ``finetune/``: the dataset without its options (but ``-bias<B>`` for a
    ``modality_bias``), ``-k<K>`` and ``-linear``. Targets differing only in other options share a folder; their
    runs' keys tell them apart."""
    dataset, k = parse_target(target)
    bias = _bias_option(dataset)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in dataset.split("?")[0] + (f"-bias{bias}" if bias
                                                                                              else ""))
    return name + (f"-k{k}" if k else "") + ("-linear" if is_linear(target) else "")


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _pretrain_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a pretraining run computes from (its config without the free settings)."""
    env = {k: v for k, v in cfg["env"].items() if k not in PRETRAIN_FREE}
    return {k: v for k, v in cfg.items() if k not in PRETRAIN_FREE} | {"env": env}


def _finetune_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tuning run computes from; the heated model is named by its run folder, which holds its key."""
    init = cfg["init"] if cfg["init"] == SCRATCH else Path(cfg["init"]).parent.name
    return {k: v for k, v in cfg.items() if k not in RESUME_FREE} | {"init": init}


def _pretrain_key(cfg: PretrainConfig) -> dict[str, Any]:
    """What a pretraining run's key hashes: its settings as the run records them and its agent's options with every
    default resolved (a changed default of the code, such as PPO's clipping, then names another run)."""
    recorded = cfg.as_recorded()
    settings = _pretrain_settings(asdict(recorded))
    options = getattr(make_agent(cfg.algo, recorded.agent), "cfg", None)
    if is_dataclass(options):
        settings["agent_resolved"] = asdict(options)
    return settings


def _saved_settings(run_dir: Path, settings) -> dict[str, Any] | None:
    try:
        return settings(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class RunRecord:
    """One run of the study and what became of it in this invocation."""

    stage: str
    """``pretrain`` or ``finetune``."""
    method: str
    seed: int
    target: str | None
    run_dir: str
    status: str = "pending"
    """``reused`` (finished before), ``resumed`` (continued from a checkpoint) or ``ran`` (started afresh)."""
    seconds: float = 0.0


@dataclass
class Study:
    """Runs the study described by a :class:`StudyConfig` and writes its results."""

    cfg: StudyConfig
    records: list[RunRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cfg.validate()
        self.cfg = replace(self.cfg, precision=resolve_precision(self.cfg.precision, resolve_device(self.cfg.device)))
        self.out = Path(self.cfg.out).resolve()
        self.targets = self.cfg.resolved_targets()
        self.pretrain_methods = [m for m in self.cfg.methods if m != SCRATCH]

    def pretrain_dir(self, method: str, seed: int) -> Path:
        key = _key(_pretrain_key(self.cfg.pretrain_config(method, seed, Path())))
        return self.out / "pretrain" / f"{method}__s{seed}__{key}"

    def finetune_run(self, method: str, seed: int, target: str) -> FinetuneConfig:
        init = SCRATCH if method == SCRATCH else str(self.pretrain_dir(method, seed) / "heated.pt")
        cfg = self.cfg.finetune_config(init, target, seed)
        folder = self.out / "finetune" / target_folder(target)
        cfg.run_dir = str(folder / f"{method}__s{seed}__{_key(_finetune_settings(asdict(cfg)))}")
        return cfg

    def plan(self) -> list[tuple[RunRecord, Any]]:
        """Every run in order: pretraining first, then fine-tuning per target, method and seed."""
        runs = []
        for method in self.pretrain_methods:
            for seed in self.cfg.seeds:
                run_dir = self.pretrain_dir(method, seed)
                runs.append((RunRecord("pretrain", method, seed, None, str(run_dir)),
                             self.cfg.pretrain_config(method, seed, run_dir)))
        for target in self.targets:
            for method in self.cfg.methods:
                for seed in self.cfg.seeds:
                    cfg = self.finetune_run(method, seed, target)
                    runs.append((RunRecord("finetune", method, seed, target, cfg.run_dir), cfg))
        return runs

    def run(self) -> list[dict[str, Any]]:
        """Run (or reuse, or resume) every run; write the results files; return the result rows."""
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        plan = self.plan()
        self.records = [r for r, _ in plan]
        started = time.perf_counter()
        for i, (record, cfg) in enumerate(plan, 1):
            what = f"{record.stage} {record.method} seed {record.seed}" + (
                f" on {target_label(record.target)}" if record.target else "")
            t0 = time.perf_counter()
            record.status = self._run_one(record, cfg)
            record.seconds = time.perf_counter() - t0
            print(f"[{i}/{len(plan)}] {what}: {record.status} ({record.seconds:.1f} s) {record.run_dir}", flush=True)
        rows = self.collect()
        self.write(rows, time.perf_counter() - started)
        return rows

    def _run_one(self, record: RunRecord, cfg: PretrainConfig | FinetuneConfig) -> str:
        run_dir = Path(record.run_dir)
        if record.stage == "pretrain":
            # heated_metrics.json is written last; a run finished before it existed is resumed to write it
            done, settings, start = ("heated.pt", "heated_metrics.json"), _pretrain_settings, pretrain
        else:
            done, settings, start = ("metrics.json",), _finetune_settings, finetune
        saved = _saved_settings(run_dir, settings)
        recorded = cfg.as_recorded() if isinstance(cfg, PretrainConfig) else cfg  # as the run writes config.json
        if saved is not None and saved != settings(asdict(recorded)):
            raise ValueError(f"run folder {run_dir} holds a run with other settings than this study's; "
                             "remove it or choose another --out")
        if saved is not None and all((run_dir / name).exists() for name in done):
            return "reused"
        resumed = (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists()
        start(cfg, resume=True)
        return "resumed" if resumed else "ran"

    def counts(self) -> dict[str, dict[str, int]]:
        """How many runs of each stage were reused, resumed or ran in this invocation."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            stage = out.setdefault(r.stage, {"reused": 0, "resumed": 0, "ran": 0})
            stage[r.status] += 1
        return out

    def collect(self) -> list[dict[str, Any]]:
        """One row per fine-tuning run: method, seed, target, every metric, the run folders."""
        rows = []
        for r in self.records:
            if r.stage != "finetune":
                continue
            m = json.loads((Path(r.run_dir) / "metrics.json").read_text())
            pre = "" if r.method == SCRATCH else str(self.pretrain_dir(r.method, r.seed))
            rows.append({"method": r.method, "seed": r.seed, "target": r.target,
                         **{k: m[k] for k in (*METRIC_NAMES, *GROUP_NAMES) if k in m}, "loss": m["loss"],
                         "split": m["split"],
                         "head": m["head"], "train_images": m["train_images"], "steps": m["steps"],
                         "pretrain_dir": pre, "finetune_dir": r.run_dir})
        return rows

    def collect_heated(self) -> list[dict[str, Any]]:
        """One row per pretraining run: method, seed, the heated model's own figures and the final policy
        diagnostics (``heated_metrics.json``, see ``agents.runner``)."""
        rows = []
        for r in self.records:
            if r.stage == "pretrain":
                figures = json.loads((Path(r.run_dir) / "heated_metrics.json").read_text())
                rows.append({"method": r.method, "seed": r.seed, **{k: v for k, v in figures.items()
                                                                     if "/" in k},
                             **diagnostics_over_run(Path(r.run_dir) / "metrics.jsonl"),
                             "setting": run_setting(Path(r.run_dir) / "config.json"), "pretrain_dir": r.run_dir})
        return rows

    def write(self, rows: list[dict[str, Any]], seconds: float) -> None:
        """Write ``study.json``, ``results.csv``, ``heated.csv``, ``results.md`` and ``results.png``."""
        self.out.mkdir(parents=True, exist_ok=True)
        heated = self.collect_heated()
        write_json(self.out / "study.json", {"config": asdict(self.cfg), "targets": list(self.targets),
                                             "counts": self.counts(), "seconds": seconds,
                                             "runs": [asdict(r) for r in self.records]})
        for name, table in (("results.csv", rows), ("heated.csv", heated)):  # pretraining only: no results.csv
            if table:
                with open(self.out / name, "w", newline="", encoding="utf-8") as fh:
                    writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for row in table for k in row)))
                    writer.writeheader()
                    writer.writerows(table)
        head, _, body = results_markdown(rows, self.cfg, self.targets).partition("Cells: ")
        text = (head + summary_markdown(rows, heated, self.cfg, self.targets) + "\n"
                + ("Cells: " + body if body else "") + heated_markdown(heated, self.cfg))
        (self.out / "results.md").write_text(text, encoding="utf-8")
        if rows:
            plot_results(rows, self.cfg.methods, self.targets, self.out / "results.png", heated)


def paired_difference(values: np.ndarray, reference: np.ndarray) -> tuple[float, float, float, int]:
    """Mean of ``values - reference`` (paired by position) and its 95% t-interval; ``(mean, low, high, n)``.

    With one pair the interval is undefined (NaN bounds).
    """
    from scipy.stats import t

    diff = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    n = len(diff)
    mean = float(diff.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def paired_p_value(values: np.ndarray, reference: np.ndarray) -> float:
    """Two-sided p-value of the paired t-test of ``values - reference``: the test behind :func:`paired_difference`'s
    interval (p < 0.05 exactly where the interval excludes 0). A difference without spread gives 0 (1 where it is 0);
    fewer than two pairs give NaN."""
    from scipy.stats import ttest_rel

    diff = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    if len(diff) < 2:
        return math.nan
    if np.ptp(diff) == 0:
        return 0.0 if diff[0] != 0 else 1.0
    return float(ttest_rel(values, reference).pvalue)


def discoveries(p_values: list[float], rate: float = 0.05) -> list[bool]:
    """Which of a family of tests stand at a false-discovery rate of ``rate`` (Benjamini-Hochberg, over the tests with
    a p-value; NaN never stands)."""
    from scipy.stats import false_discovery_control

    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    stands = [False] * len(p_values)
    if tested:
        for i, adjusted in zip(tested, false_discovery_control([p_values[i] for i in tested])):
            stands[i] = bool(adjusted < rate)
    return stands


def _by(rows: list[dict[str, Any]], method: str, target: str | None, metric: str) -> dict[int, float]:
    """Seed -> value of ``metric`` for ``method`` on ``target`` (heated rows have no target: None)."""
    return {r["seed"]: float(r[metric]) for r in rows
            if r["method"] == method and r.get("target") == target and r.get(metric, "") != ""}


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _tables(rows: list[dict[str, Any]], methods: list[str], target: str | None, columns: list[str],
            names: list[str] | None = None) -> list[str]:
    """Markdown lines: mean ± standard deviation per method over ``columns``, then each method's paired difference
    to ``none`` (same seed) with its 95% t-interval. ``names`` are the column headings (default: ``columns``)."""
    header = "| method | n | " + " | ".join(names or columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    lines = [header, rule]
    for m in methods:
        cells = [_mean_std(list(_by(rows, m, target, k).values())) for k in columns]
        lines.append(f"| {m} | {max(len(_by(rows, m, target, k)) for k in columns)} | " + " | ".join(cells) + " |")
    lines.append("")
    if BASELINE in methods and len(methods) > 1:
        lines += [f"Paired difference to `{BASELINE}` (method - {BASELINE}, same seed): mean over seeds "
                  "[95% confidence interval, t distribution with n - 1 degrees of freedom].", "", header, rule]
        for m in methods:
            if m == BASELINE:
                continue
            cells, pairs = [], 0
            for k in columns:
                ref, val = _by(rows, BASELINE, target, k), _by(rows, m, target, k)
                seeds = sorted(set(ref) & set(val))
                if not seeds:
                    cells.append("")
                    continue
                mean, low, high, pairs = paired_difference([val[s] for s in seeds], [ref[s] for s in seeds])
                cells.append(f"{mean:+.4f}" + ("" if math.isnan(low) else f" [{low:+.4f}, {high:+.4f}]"))
            lines.append(f"| {m} | {pairs} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


SUMMARY_HEATED = {"heated/test/shortcut_gap": "heated: gap", "heated/test/marker_gap": "heated: marker gap",
                  f"heated/test/{WORST_GROUP}": "heated: worst group",
                  "heated/shifted/accuracy": "heated: shifted acc.",
                  "heated/shifted_perturbed/accuracy": "heated: shifted acc., perturbed"}
"""The heated-model figures in the summary table, with their headings."""


def summary_markdown(rows: list[dict[str, Any]], heated: list[dict[str, Any]], cfg: StudyConfig,
                     targets: tuple[str, ...]) -> str:
    """One table for the whole study: per method, the heated model's shortcut gap and shifted accuracy (clean, and
    perturbed as in training) and the accuracy after fine-tuning on each target, each as the mean over seeds and the
    paired difference to ``none`` with its 95% t-interval; ``*`` marks the differences that stand when the table's
    paired t-tests are read as one family (:func:`discoveries`, a false-discovery rate of 5%)."""
    methods = [m for m in cfg.methods if any(r["method"] == m for r in [*rows, *heated])]
    columns: list[tuple[list[dict[str, Any]], str | None, str, str]] = [
        (heated, None, k, name) for k, name in SUMMARY_HEATED.items() if any(k in r for r in heated)]
    columns += [(rows, t, "accuracy", target_label(t)) for t in targets]
    if not columns:
        return ""
    cells: dict[str, list[str]] = {}
    p_values: list[float] = []
    where: list[tuple[str, int]] = []
    for m in methods:
        cells[m] = []
        for table, target, key, _ in columns:
            val, ref = _by(table, m, target, key), _by(table, BASELINE, target, key)
            cell = f"{np.mean(list(val.values())):.3f}" if val else ""
            seeds = sorted(set(val) & set(ref))
            if m != BASELINE and seeds:  # seeds: both have values
                pairs = [val[s] for s in seeds], [ref[s] for s in seeds]
                mean, low, high, _ = paired_difference(*pairs)
                cell += f" ({mean:+.3f}" + ("" if math.isnan(low) else f" [{low:+.3f}, {high:+.3f}]") + ")"
                p_values.append(paired_p_value(*pairs))
                where.append((m, len(cells[m])))
            cells[m].append(cell)
    for (m, i), stands in zip(where, discoveries(p_values)):
        cells[m][i] += "*" if stands else ""
    tested = sum(not math.isnan(p) for p in p_values)
    lines = ["## Summary", "",
             f"Mean over seeds; in brackets the paired difference to `{BASELINE}` (same seed) with its 95% t-interval. "
             "Heated: the pretrained model itself before fine-tuning, on the pretraining task's test split (gaps, "
             "worst group) and its shifted split (accuracy; the shortcut's cue independent of the class), on clean "
             "inputs and on inputs perturbed as in its training. "
             "The other columns: accuracy after fine-tuning (or a linear probe) on each target."
             + (f" `*`: the difference stands at a false-discovery rate of 5% over the table's {tested} paired t-tests "
                "(Benjamini-Hochberg); an interval that excludes 0 without a `*` is p < 0.05 for its cell alone: "
                f"were every true difference 0, about {0.05 * tested:.0f} of the {tested} intervals would exclude it."
                if tested
                else ""), "",
             "| method | " + " | ".join(name for *_, name in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {m} | " + " | ".join(cells[m]) + " |" for m in methods]
    return "\n".join(lines + [""])


def results_markdown(rows: list[dict[str, Any]], cfg: StudyConfig, targets: tuple[str, ...]) -> str:
    """The results table: mean ± standard deviation per method and target, then paired differences to ``none``;
    on targets that know each image's modality, also the shortcut metrics."""
    methods = [m for m in cfg.methods if any(r["method"] == m for r in rows)]
    n = len(cfg.seeds)
    pre = f"{cfg.pretrain_steps} steps" if cfg.pretrain_steps else f"{cfg.pretrain_epochs} epochs"
    fewshot = f" ({cfg.fewshot_epochs} on few-shot targets)" if cfg.fewshot_epochs else ""
    rates = cfg.finetune_rates()
    finetuning = (f"fine-tuning on clean images for {cfg.finetune_epochs} epochs{fewshot}, {cfg.finetune_schedule} "
                  f"schedule from lr {rates['heated']} (scratch: {rates[SCRATCH]}, linear probe: "
                  f"{rates['linear_probe']}) after {cfg.warmup_epochs} warm-up epochs" if targets else "no fine-tuning")
    setting = (
        f"Pretraining on `{cfg.pretrain_dataset}` ({cfg.classifier}, {cfg.image_size} px, {pre}, lr {cfg.pretrain_lr}, "
        f"grid {cfg.grid}, blur {cfg.blur_kernel}/{cfg.blur_sigma}"
        + (f", mask operator {cfg.mask_op}" if cfg.mask_op != "multiply" else "")
        + f"); {finetuning}; batch {cfg.batch_size}; "
        f"classifiers trained in {cfg.precision}, evaluated in fp32. Seeds {list(cfg.seeds)} (n = {n} per cell). "
        "Metrics on each target's test split (val where it has none)."
    )
    lines = ["# Comparison study", "", setting, "", "Cells: mean ± sample standard deviation over seeds.", ""]
    if not targets:
        return "\n".join(lines)
    twins = ("balanced_accuracy", "macro_recall")
    if rows and all(math.isclose(r["accuracy"], r[k], abs_tol=1e-9) for r in rows for k in twins):
        lines += ["The test splits are class-balanced, so accuracy, balanced accuracy and macro recall coincide.", ""]
    if any("shortcut_gap" in r for r in rows):
        lines += ["`shortcut_gap`: accuracy on images shown in their class's preferred modality minus accuracy on "
                  "the others (synthrad targets only; near 0 for a classifier that reads the content, not the "
                  "modality).", ""]
    if any("marker_gap" in r for r in rows):
        lines += ["`marker_gap`: accuracy on images whose marker spells their class minus accuracy on the others "
                  "(synthrad's marker shortcut).", ""]
    if any(WORST_GROUP in r for r in rows):
        lines += [f"`{WORST_GROUP}`: the lowest accuracy over the groups of images that agree or conflict alike with "
                  "every shortcut of the target (with one shortcut: the shortcut-conflicting images).", ""]
    for target in targets:
        columns = list(METRIC_NAMES)
        for names in (SHORTCUT_NAMES, MARKER_NAMES, (WORST_GROUP,)):
            if any(r["target"] == target and names[-1] in r for r in rows):
                columns += list(names)
        lines += [f"## {target_label(target)}", "", f"`{target}`", ""]
        lines += _tables(rows, methods, target, columns)
    if n < 2:
        lines += ["With one seed there is no spread and no confidence interval; run more seeds.", ""]
    return "\n".join(lines)


HEATED_COLUMNS = {"accuracy": "accuracy", "shortcut_gap": "gap", "accuracy_other": "acc. other modalities",
                  "marker_gap": "marker gap", WORST_GROUP: "worst group"}
"""The heated model's figures shown per split, with their headings."""
DIAGNOSTIC_COLUMNS = {
    "mask_mean": "mask mean", "kl_uniform": "KL to Beta(1,1)", "kl_initial": "KL to step 0",
    "image_spread": "spread over images", "cell_spread": "spread over cells", "content_gap": "content gap",
    "content_gap_image_specific": "image-specific content gap", "marker_gap": "marker gap",
    "marker_gap_image_specific": "image-specific marker gap",
}
"""The policy diagnostics shown at the end of pretraining (``agents.diagnostics``), with their headings."""


def heated_markdown(rows: list[dict[str, Any]], cfg: StudyConfig) -> str:
    """The heated models before fine-tuning (clean and perturbed as in training) and the policies' diagnostics."""
    methods = [m for m in cfg.methods if any(r["method"] == m for r in rows)]
    if not rows:
        return ""
    splits = sorted((k.split("/")[1] for k in rows[0] if k.startswith("heated/") and k.endswith("/accuracy")
                     and "_perturbed" not in k), key=lambda split: split == "shifted")
    lines = ["# The heated models, before fine-tuning", "",
             "Each pretraining run's classifier on the pretraining task's test split and, for synthrad, on its "
             "modality-shifted split (modality independent of the class), on clean inputs and on inputs perturbed as "
             "in its training (masks drawn from its final policy): masked training and clean evaluation differ in "
             "their inputs, so a smaller gap on clean inputs alone is no evidence of less shortcut.", ""]
    for perturbed in (False, True):
        columns, names = [], []
        for split in splits:
            name = f"{split}_perturbed" if perturbed else split
            for k, heading in HEATED_COLUMNS.items():
                if f"heated/{name}/{k}" in rows[0]:
                    columns.append(f"heated/{name}/{k}")
                    names.append(f"{split} {heading}")
        lines += [f"## {'Perturbed as in training' if perturbed else 'Clean inputs'}", ""]
        lines += _tables(rows, methods, None, columns, names)
    learned = [m for m in methods if any(f"diagnostics/{k}" in r for r in rows if r["method"] == m
                                         for k in DIAGNOSTIC_COLUMNS)]
    if learned:
        shown = {k: v for k, v in DIAGNOSTIC_COLUMNS.items() if any(f"diagnostics/{k}" in r for r in rows)}
        columns = [f"diagnostics/{k}" for k in shown]
        lines += ["# What the policy learned", "",
                  "At the end of pretraining, on a fixed probe batch of validation images (see `agents/diagnostics.py`"
                  " and docs/method.md): drift of the concentrations raises the KL to step 0 but leaves the spread "
                  "over images at 0; a mask that follows each image's content has an image-specific content gap "
                  "(mask on anatomy and lesion minus mask on the background, beyond what the average mask gives).",
                  "", "| method | n | " + " | ".join(shown.values()) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for m in learned:
            cells = [_mean_std(list(_by(rows, m, None, k).values())) for k in columns]
            lines.append(f"| {m} | {len(_by(rows, m, None, columns[0]))} | " + " | ".join(cells) + " |")
        lines += ["", "Settings of each learned method (the agent's options, defaults resolved):", ""]
        for m in learned:
            settings = sorted({r.get("setting", "") for r in rows if r["method"] == m} - {""})
            lines.append(f"- `{m}`: " + ("; ".join(settings) or "-"))
        lines.append("")
        peaked = {k: v for k, v in PEAK_COLUMNS.items() if any(f"peak/{k}" in r for r in rows)}
        peaks = [f"peak/{k}" for k in peaked]
        lines += ["## Over the run", "",
                  "The most extreme value each diagnostic reached in any logging window of the run (for the content "
                  "gap, the largest in magnitude), and the mean step it was logged at: a pattern the classifier "
                  "catches up with fades before the end.", "",
                  "| method | n | " + " | ".join(f"{v} (step)" for v in peaked.values()) + " |",
                  "|---|---|" + "---|" * len(peaks)]
        for m in learned:
            cells = [f"{_mean_std(list(_by(rows, m, None, k).values()))} "
                     f"({np.mean(list(_by(rows, m, None, k + '_step').values())):.0f})"
                     if _by(rows, m, None, k) else "-" for k in peaks]
            lines.append(f"| {m} | {max(len(_by(rows, m, None, k)) for k in peaks)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


PEAK_COLUMNS = {"kl_initial": "KL to step 0", "image_spread": "spread over images", "cell_spread": "spread over cells",
                "content_gap": "content gap", "marker_gap": "marker gap"}
"""The diagnostics read over the whole run (their most extreme logged value): a pattern the classifier catches up with
fades before the run ends (docs/budget-notes.md), so the last value alone can hide that the policy learned."""


def diagnostics_over_run(metrics_path: Path) -> dict[str, float]:
    """``peak/<name>``: the most extreme value of each :data:`PEAK_COLUMNS` diagnostic over a pretraining run's logged
    windows (the largest, or for the content gap the largest in magnitude, with its sign), and ``peak/<name>_step``
    the step it was logged at; empty for a run that logged no diagnostics."""
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    records = [json.loads(line) for line in lines if '"diagnostics/' in line]
    out: dict[str, float] = {}
    for name in PEAK_COLUMNS:
        series = [(r["step"], r[f"diagnostics/{name}"]) for r in records if f"diagnostics/{name}" in r]
        if series:
            step, value = max(series, key=lambda sv: abs(sv[1]))
            out[f"peak/{name}"], out[f"peak/{name}_step"] = value, step
    return out


SETTING_KEYS = ("objective", "param", "policy_lr", "budget_concentration", "normalize_advantage", "baseline",
                "clip_range", "target_kl_per_cell", "n_steps")
"""The agent options that say how a policy learns, named beside its diagnostics."""


def run_setting(config_path: Path) -> str:
    """How a pretraining run's policy learned, in one line: its reward settings and the agent options of
    :data:`SETTING_KEYS` it ran with (defaults resolved; empty for an agent without them)."""
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        agent = make_agent(cfg["algo"], cfg["agent"])
    except (OSError, ValueError, KeyError):
        return ""
    options = getattr(agent, "cfg", None)
    if options is None:
        return ""
    env = cfg["env"]
    values = {k: getattr(options, k) for k in SETTING_KEYS if hasattr(options, k)}
    if "policy_lr" in values and values["policy_lr"] is None:
        values["policy_lr"] = env["lr"] / 10
    values = {"reward": env["reward"], "mask_budget": env["mask_budget"], "reward_forward": env["reward_forward"],
              "reward_reference": env["reward_reference"], **values}
    return ", ".join(f"{k} {v}" for k, v in values.items() if v is not None)


def with_synthrad_option(spec: str, key: str, value: object) -> str:
    """``spec`` with the generator option ``key=value`` set (replacing an earlier value)."""
    base, _, query = spec.partition("?")
    options = [o for o in query.split("&") if o and o.split("=")[0] != key] + [f"{key}={value}"]
    return f"{base}?{'&'.join(options)}"


def bias_sweep(cfg: StudyConfig, biases: tuple[float, ...]) -> str:
    """Pretrain ``cfg.methods`` on synthrad at each ``modality_bias`` (pretraining only, ``cfg.out/bias-<b>``) and
    return a Markdown table of the heated models' shortcut figures: mean over seeds [95% t-interval].

    At bias 1/3 modality carries no information about the class, so the gap should be near 0; as the bias grows,
    a classifier that leans on modality texture shows a growing gap and a falling shifted accuracy."""
    if not cfg.pretrain_dataset.startswith("synthrad") or cfg.pretrain_dataset.startswith("synthrad:unseen"):
        raise ValueError(f"a bias sweep needs synthrad's pretraining task, not {cfg.pretrain_dataset!r}")
    columns = {"heated/test/accuracy": "test accuracy", "heated/test/shortcut_gap": "shortcut gap",
               "heated/test/accuracy_other": "test acc. other modalities",
               "heated/shifted/accuracy": "shifted accuracy", "heated/shifted/shortcut_gap": "shifted gap"}
    lines = ["| modality_bias | method | n | " + " | ".join(columns.values()) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for bias in biases:
        run = replace(cfg, targets=(), out=str(Path(cfg.out) / f"bias-{bias:.4g}"),
                      pretrain_dataset=with_synthrad_option(cfg.pretrain_dataset, "modality_bias", bias))
        study = Study(run)
        study.run()
        rows = study.collect_heated()
        for m in study.pretrain_methods:
            cells, n = [], 0
            for key in columns:
                values = list(_by(rows, m, None, key).values())
                mean, low, high, n = paired_difference(values, [0.0] * len(values))
                cells.append(f"{mean:.3f}" + ("" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]"))
            lines.append(f"| {bias:.3g} | {m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


HEATED_PANELS = {"shortcut_gap": "heated model: shortcut gap", "accuracy": "heated model: accuracy"}
"""The heated-model figures plotted beside the fine-tuning metrics, per split, clean and perturbed as in training."""


def _bars(ax, groups: list[list[list[float]]], names: list[str], labels: list[str]) -> None:
    """Grouped bars: ``groups[g][j]`` holds the values (over seeds) of bar ``j`` of group ``g``; mean ± 1 sd."""
    width = 0.8 / len(labels)
    x = np.arange(len(groups))
    for j, label in enumerate(labels):
        vals = [g[j] for g in groups]
        means = [np.mean(v) if v else np.nan for v in vals]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x + (j - (len(labels) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=label)
    ax.set_xticks(x, names, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


PLOT_METRICS = {"accuracy": "accuracy after fine-tuning", "macro_f1": "macro F1 after fine-tuning",
                "shortcut_gap": "shortcut gap after fine-tuning (synthrad targets)"}
"""The fine-tuning metrics plotted, one full-width panel each (the others are in results.md)."""


def plot_results(rows: list[dict[str, Any]], methods: tuple[str, ...], targets: tuple[str, ...], path: Path,
                 heated: list[dict[str, Any]] | None = None) -> None:
    """One full-width panel per fine-tuning metric of :data:`PLOT_METRICS` (a bar per method within each target,
    mean over seeds with ± one standard deviation), and with ``heated`` rows a last row of two panels: the heated
    models' shortcut gap and accuracy on the test and shifted splits, clean and perturbed as in training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    heated = heated or []
    splits = [s for s in ("test", "shifted") if heated and f"heated/{s}/shortcut_gap" in heated[0]]
    metrics = {k: v for k, v in PLOT_METRICS.items() if any(r.get(k, "") != "" for r in rows)}
    panels = len(metrics) + (1 if splits else 0)
    fig = plt.figure(figsize=(max(10.0, 1.1 * len(targets) * max(1, len(methods)) / 3), 3.2 * panels + 0.8))
    grid = fig.add_gridspec(panels, 2)
    legend_ax = None
    for row, (metric, title) in enumerate(metrics.items()):
        ax = fig.add_subplot(grid[row, :])
        shown = [t for t in targets if any(r["target"] == t and r.get(metric, "") != "" for r in rows)]
        _bars(ax, [[list(_by(rows, m, t, metric).values()) for m in methods] for t in shown],
              [target_label(t) for t in shown], methods)
        ax.set_title(title)
        legend_ax = legend_ax or ax
    if splits:
        pretrained = [m for m in methods if any(r["method"] == m for r in heated)]
        names = [f"{s}{' perturbed' if p else ''}" for s in splits for p in (False, True)]
        for col, (key, title) in enumerate(HEATED_PANELS.items()):
            ax = fig.add_subplot(grid[panels - 1, col])
            _bars(ax, [[list(_by(heated, m, None, f"heated/{n.replace(' perturbed', '_perturbed')}/{key}").values())
                        for m in pretrained] for n in names], names, pretrained)
            ax.set_title(title)
    handles, labels = legend_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(methods), 6), fontsize=8)
    fig.suptitle("Mean over seeds, error bars ± 1 s.d.; the heated models (before fine-tuning) in the last row")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
