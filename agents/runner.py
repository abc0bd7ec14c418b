"""Pretraining runs: an agent drives the environment; the runner logs, evaluates, checkpoints and resumes.

A run folder holds ``config.json``, TensorBoard events, ``metrics.jsonl``, ``checkpoint.pt`` (and
``checkpoint.prev.pt``, the one before) and, at the end, ``heated.pt`` and ``heated_metrics.json``. Checkpoints are
written
atomically every ``ckpt_every`` steps and at every epoch end; they hold the classifier, its
optimiser, the agent's state, the data position and every RNG state, so a resumed run continues
exactly as the uninterrupted run would have.

What a run measures beyond losses and rewards:

- every logging step, for an agent with a mask distribution, the policy diagnostics of ``agents.diagnostics`` on
  a fixed probe batch of validation images (``diagnostics/...``), and at the first step, every ``image_every``
  steps and the last, the probe drawn per class (``agents.mask_figure``) and the histogram of the step's grids;
- every validation pass (every epoch end, and every ``eval_every`` steps), the validation split on clean inputs
  (``val/...``) and, for an agent that perturbs its inputs, on inputs perturbed as in training (``val_perturbed/...``),
  with, on data that knows each image's modality (synthrad), the shortcut metrics (``val/shortcut_gap`` ...;
  ``classifiers.metrics.shortcut_metrics``);
- at the end, the heated model's own figures (``heated/<split>/...`` and ``heated/<split>_perturbed/...``): on the
  test split and, for synthrad's pretraining task, its modality-shifted split, on clean inputs and on inputs
  perturbed as in training (masks drawn from the agent's final policy; ``Agent.evaluation_action``). They go to
  ``metrics.jsonl`` and ``heated_metrics.json`` (with the final diagnostics); TensorBoard shows them as one table
  (``heated/table``) and the key ones (``agents.overview.key_figures``) as scalars.

TensorBoard also gets what a reader needs first (``agents.overview``): an overview layout of custom scalars, a legend
in the Text tab, and the run's row of the HParams dashboard (every setting, with the agent's defaults resolved, and the
key final figures).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributions import Beta
from tqdm import tqdm

from agents.base import Agent
from agents.diagnostics import expected_masks, make_probe, mean_mask_per_class, policy_diagnostics
from agents.mask_figure import probe_figure
from agents.overview import LEGEND, OVERVIEW, SHOWN_SETTINGS, heated_table, key_figures
from agents.registry import AGENTS, environment_for, make_agent, options_for
from classifiers.checkpoint import (
    decorrelate_ranks,
    open_run,
    run_rng_state,
    seed_everything,
    set_run_rng_state,
    write_checkpoint,
)
from classifiers.data import load_dataset, make_loader
from classifiers.distributed import all_mean, barrier, init_from_env, is_main, shutdown
from classifiers.figures import draw
from classifiers.heated import save_heated
from classifiers.metrics import SCALAR_METRICS
from classifiers.runlog import RunLogger, ScalarWindow, Throughput, hparams_table, write_json
from classifiers.train import evaluate, with_saved_precision
from envs.core import EnvConfig, PretrainCore, StepResult


@dataclass
class PretrainConfig:
    """A pretraining run: the environment, the agent and the run's bookkeeping."""

    algo: str = "reinforce"
    """Agent name in the registry (``agents.registry``)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment."""
    agent: dict[str, Any] = field(default_factory=dict)
    """Agent options (only those the agent accepts are used)."""
    epochs: int = 1
    """Passes over the training set."""
    max_steps: int | None = None
    """Stop after this many classifier steps in all (None: after ``epochs``)."""
    run_dir: str = ""
    """Run folder (empty: ``runs/<algo>__<dataset>__s<seed>__<time>``)."""
    log_every: int = 10
    """Steps between scalar logs."""
    image_every: int = 100
    """Steps between mask and masked-image grids and histograms in TensorBoard."""
    ckpt_every: int = 100
    """Steps between checkpoints (also written at every epoch end and at the end)."""
    eval_batch_size: int = 256
    """Batch size of the validation passes."""
    eval_every: int | None = None
    """Steps between validation passes within an epoch (clean and perturbed), for runs shorter than an epoch or
    curves finer than one point per epoch; None: at every epoch end only (where a pass always runs)."""

    def validate(self) -> None:
        self.env.validate()
        if self.epochs < 1:
            raise ValueError(f"epochs {self.epochs} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max steps {self.max_steps} must be at least 1")
        for name in ("log_every", "image_every", "ckpt_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every {self.eval_every} must be at least 1 (or None: at epoch ends only)")

    def as_recorded(self, chosen_env: Collection[str] = ()) -> PretrainConfig:
        """This configuration as its run records it in ``config.json``: with the environment settings and agent
        options its algo registers (``agents.registry.environment_for`` and ``options_for``), except the
        ``chosen_env`` fields the user set explicitly."""
        return dataclasses.replace(self, env=environment_for(self.algo, self.env, chosen_env),
                                   agent=options_for(self.algo, self.agent))

    def default_run_dir(self) -> str:
        data = self.env.dataset.split("?")[0].replace(":", "-").replace("/", "_")
        return str(Path("runs") / f"{self.algo}__{data}__s{self.env.seed}__{time.strftime('%Y%m%d-%H%M%S')}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        d = dict(d)
        d["env"] = EnvConfig(**with_saved_precision(d["env"]))
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class PretrainRunner:
    """Owns a run: builds the environment core and the agent, logs, evaluates, checkpoints."""

    def __init__(self, cfg: PretrainConfig, resume: bool = False, keep_saved_length: bool = False,
                 chosen_env: Collection[str] = ()) -> None:
        """Args:
            cfg: the run's configuration. When resuming, the saved configuration is used instead, except
                ``epochs`` and ``max_steps``, which come from ``cfg`` (so a run can be extended) unless
                ``keep_saved_length``.
            resume: continue the run in ``cfg.run_dir`` from its newest intact checkpoint (a fresh start
                when it has none).
            chosen_env: ``EnvConfig`` fields the user set explicitly: the algo's registered environment settings
                do not replace them (``agents.registry.environment_for``).
        """
        cfg.validate()
        make_agent(cfg.algo, cfg.agent)  # an unknown algo or a bad agent option fails before anything is written
        cfg = cfg.as_recorded(chosen_env)
        self.cfg = cfg
        init_from_env(cfg.env.device)
        self.main = is_main()
        self.run_dir = Path(cfg.run_dir or cfg.default_run_dir())
        state = open_run(self.run_dir, resume, "core", self.main)
        if state is not None:
            saved = PretrainConfig.from_dict(state["config"])
            if not keep_saved_length:
                saved.epochs, saved.max_steps = cfg.epochs, cfg.max_steps
            self.cfg = cfg = saved
        self.agent: Agent = make_agent(cfg.algo, cfg.agent)
        data = load_dataset(cfg.env.dataset, image_size=cfg.env.image_size)
        self.cfg = cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env))  # ours to record into
        self.core = PretrainCore(cfg.env, data=data)
        cfg.env.precision = self.core.dev.precision  # resolved: config.json and the checkpoints say what ran
        self.val_loader = make_loader(data, "val", cfg.eval_batch_size, train=False)
        total = cfg.epochs * self.core.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.agent.bind(self.core, self.total_steps)
        self.probe = make_probe(data, self.core.dev.device) if self.main else None
        self.initial_policy = None
        """The policy's Beta on the probe at step 0, kept as ``(alpha, beta)`` for ``diagnostics/kl_initial``."""
        if state is not None:
            try:
                self.core.load_state_dict(state["core"])
                self.agent.load_state_dict(state["agent"])
            except (RuntimeError, KeyError, ValueError) as exc:  # shapes or names the code no longer builds
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(f"the checkpoint in {self.run_dir} does not fit the classifier or agent this code "
                                 f"builds from its config.json ({first}); it was written by other code or defaults: "
                                 "resume it with that code, or start a new run (another --run-dir)") from None
            self.initial_policy = state.get("initial_policy")
            set_run_rng_state(state["rng"], cfg.env.seed, self.core.global_step)
            self.logger = RunLogger(self.run_dir, self.main, purge_step=self.core.global_step + 1,
                                    resume_offset=state["metrics_offset"])
        else:
            seed_everything(cfg.env.seed)
            self.core.reset(seed=cfg.env.seed)
            self.initial_policy = self._probe_distribution()
            decorrelate_ranks(cfg.env.seed)  # after the classifier's initialisation, which every rank shares
            self.logger = RunLogger(self.run_dir, self.main)
            if self.main:
                write_json(self.run_dir / "config.json", asdict(cfg))
                self._describe_run()
        self.window = ScalarWindow()
        self.throughput = Throughput()
        self.last_val: dict[str, float] = {}
        self._perturbs: bool | None = None

    def _describe_run(self) -> None:
        """What a new run's TensorBoard shows before its first step: the settings (Text tab and HParams), the legend
        and the overview layout (``agents.overview``)."""
        settings = self._flat_config()
        self.logger.text("hyperparameters", hparams_table(settings))
        self.logger.text("about/legend", LEGEND)
        self.logger.layout(OVERVIEW)
        every_option = {f"agent.{o}" for entry in AGENTS.values() for o in entry.options}
        self.logger.hparams(settings, key_figures(self.core.data.eval_split), self.run_dir.name, every_option,
                            SHOWN_SETTINGS)

    def _flat_config(self) -> dict[str, Any]:
        """Every setting of the run, flat: ``env.<field>``, ``agent.<option>`` (defaults resolved,
        :func:`resolved_options`), the run's own fields, and the device the run resolved."""
        c = asdict(self.cfg)
        return {**{f"env.{k}": v for k, v in c.pop("env").items()},
                **{f"agent.{k}": v for k, v in resolved_options(self.agent, c.pop("agent")).items()}, **c,
                "resolved_device": str(self.core.dev.device)}

    def _probe_distribution(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The agent's current per-cell Beta on the probe images as CPU ``(alpha, beta)`` (None without one)."""
        if self.probe is None:
            return None
        dist = self.agent.mask_distribution(self.probe.images)
        if dist is None:
            return None
        return dist.concentration1.detach().float().cpu(), dist.concentration0.detach().float().cpu()

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """The policy diagnostics (``agents.diagnostics``) on the probe batch now; empty without a mask policy."""
        if self.probe is None:
            return {}
        policy = self.agent.mask_policy(self.probe.images)
        if policy is None:
            return {}
        initial = None
        if self.initial_policy is not None:
            device = self.core.dev.device
            initial = Beta(self.initial_policy[0].to(device), self.initial_policy[1].to(device))
        return policy_diagnostics(policy, self.probe, self.core.mask, initial, self.core.applied_grid)

    def done(self) -> bool:
        return self.core.global_step >= self.total_steps

    def after_step(self, result: StepResult, scalars: dict[str, Any]) -> None:
        """Called after every classifier step: accumulate, log, evaluate at epoch end, checkpoint. Its time is kept
        off the window's clock (``perf/overhead`` reports it)."""
        with self.window.paused():
            self._after_step(result, scalars)

    def _after_step(self, result: StepResult, scalars: dict[str, Any]) -> None:
        step = self.core.global_step
        grid = result.grid  # as applied, after any mask budget
        values = {"train/loss": result.loss.mean(), "train/accuracy": result.correct.mean(),
                  "reward/mean": result.reward.mean(), "reward/std": result.reward.std(correction=0), **scalars}
        if grid is not None:
            values |= {"mask/mean": grid.mean(), "mask/std": grid.std()}
        if result.biased_loss is not None:
            values |= {"biased/loss": result.biased_loss.mean(), "biased/accuracy": result.biased_correct.mean()}
        self.window.add(values)
        if self.pbar is not None:
            self.pbar.update(1)
        epoch_end = self.core.exhausted
        checkpoint = epoch_end or self.done() or step % self.cfg.ckpt_every == 0
        # Logging windows close at every checkpoint, so a resumed run logs exactly what an uninterrupted one does.
        if step % self.cfg.log_every == 0 or checkpoint:
            self._log_window(step)
        if self.main and grid is not None and (step % self.cfg.image_every == 0 or step == 1 or self.done()):
            self._log_images(step, grid)
        if checkpoint:
            self.core.sync_buffers()
        if epoch_end or self.done() or (self.cfg.eval_every and step % self.cfg.eval_every == 0):
            self._evaluate(step)
        if checkpoint:
            self.checkpoint_pending = True
            self.save_pending_checkpoint()

    def save_pending_checkpoint(self, force: bool = False) -> None:
        """Write the checkpoint that fell due (or, with ``force``, one anyway) if the agent can be resumed exactly
        from here (:meth:`Agent.checkpoint_ready`); a deferred one closes the logging window first, as every
        checkpoint does."""
        if not ((self.checkpoint_pending or force) and self.agent.checkpoint_ready()):
            return
        with self.window.paused():
            if self.window.steps:
                self._log_window(self.core.global_step)
                self.core.sync_buffers()
            self.save_checkpoint()

    def _log_window(self, step: int) -> None:
        means = {k: all_mean(v.to(self.core.dev.device)).item() for k, v in self.window.means().items()}
        means |= self.throughput.close(self.window, self.window.steps * self.cfg.env.batch_size * self.core.world_size)
        means["train/lr"] = self.core.optimizer.param_groups[0]["lr"]
        means["train/epoch"] = float(self.core.epoch)
        if self.main:
            means |= {k: float(v) for k, v in self.diagnostics().items()}
        self.logger.scalars(step, means)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{means['train/loss']:.3f}", acc=f"{means['train/accuracy']:.3f}")
        self.window.reset()

    def _log_images(self, step: int, grid: torch.Tensor) -> None:
        """The histogram of the step's grids, and the probe drawn per class (``agents.mask_figure``) for an agent with
        a mask policy; its masked inputs come from a generator seeded with the run's seed, so every picture of a run
        draws the same random numbers and differs by the policy alone."""
        self.logger.histogram(step, "mask/values", grid)
        core, probe = self.core, self.probe
        policy = self.agent.mask_policy(probe.images) if probe is not None else None
        if policy is None:
            return
        expected = expected_masks(policy, core.mask, core.applied_grid)
        with torch.no_grad(), self._seeded_rng():
            action = self.agent.evaluation_action(probe.images)
            masked = core.inputs(probe.images, action.grid, action.perturb, action.augment)
        figure = probe_figure(probe.images.float() / 255.0, expected,
                              masked * core.normalizer.std + core.normalizer.mean, probe.labels,
                              mean_mask_per_class(expected, probe.labels, probe.num_classes), core.data.class_names,
                              self.cfg.env.mask_op)
        self.logger.picture(step, "images/probe_masks", draw(figure))

    @contextmanager
    def _seeded_rng(self) -> Iterator[None]:
        """A block whose random numbers come from the run's seed, leaving the run's own random streams as they were."""
        with torch.random.fork_rng(devices=[self.core.dev.device] if self.core.dev.cuda else []):
            torch.manual_seed(self.cfg.env.seed)
            yield

    def _evaluate(self, step: int) -> None:
        """The validation pass: ``val/...`` on clean inputs and, for an agent that perturbs them, ``val_perturbed/...``
        on inputs perturbed as in training (:meth:`evaluate_split`)."""
        if self.main:
            metrics = self.evaluate_split("val", perturbed=False, loader=self.val_loader)
            self.last_val = {f"val/{k}": float(metrics[k]) for k in SCALAR_METRICS if k in metrics}
            values = dict(self.last_val)
            if self.perturbs():
                metrics = self.evaluate_split("val", perturbed=True, loader=self.val_loader)
                values |= {f"val_perturbed/{k}": float(metrics[k]) for k in SCALAR_METRICS if k in metrics}
            self.logger.scalars(step, values)
        barrier()

    def perturbs(self) -> bool:
        """Whether the agent changes the classifier's inputs (a grid, a perturbation or an augmentation), judged once
        from its evaluation action on the probe (or the current batch)."""
        if self._perturbs is None:
            with self._seeded_rng():
                action = self.agent.evaluation_action(self.probe.images if self.probe else self.core.images)
            self._perturbs = any(x is not None for x in (action.grid, action.perturb, action.augment))
        return self._perturbs

    def heated_splits(self) -> list[str]:
        """The splits the heated model is reported on: the test split (val without one) and synthrad's shifted one."""
        data = self.core.data
        return [data.eval_split] + (["shifted"] if "shifted" in data.splits else [])

    def evaluate_split(self, split: str, perturbed: bool, loader: Any = None) -> dict[str, Any]:
        """The classifier's metrics on ``split`` (read by ``loader``, or a new loader), clean or perturbed as in
        training (masks drawn from the agent's current policy, from a generator seeded with the run's seed, so the
        figures are reproducible and training's random streams are left alone)."""
        core = self.core
        if loader is None:
            loader = make_loader(core.data, split, self.cfg.eval_batch_size, train=False)
        agreement = core.data.shortcut_agreement(split)
        if not perturbed:
            return evaluate(core.classifier, loader, core.dev, core.normalizer, agreement)

        def inputs(images: torch.Tensor) -> torch.Tensor:
            action = self.agent.evaluation_action(images)
            return core.inputs(images, action.grid, action.perturb, action.augment)

        with self._seeded_rng():
            return evaluate(core.classifier, loader, core.dev, inputs, agreement)

    def _report_heated(self) -> None:
        """Log the heated model's own figures and the final diagnostics; write ``heated_metrics.json``; close the run's
        HParams row."""
        step = self.core.global_step
        figures: dict[str, float] = {}
        for split in self.heated_splits():
            clean = self.evaluate_split(split, perturbed=False)
            masked = self.evaluate_split(split, perturbed=True) if self.perturbs() else clean
            for name, metrics in ((split, clean), (f"{split}_perturbed", masked)):
                figures |= {f"heated/{name}/{k}": float(metrics[k]) for k in SCALAR_METRICS if k in metrics}
        diagnostics = {k: float(v) for k, v in self.diagnostics().items()}
        self.logger.scalars(step, figures, tensorboard=key_figures(self.core.data.eval_split))
        self.logger.text("heated/table", heated_table(figures), step)
        self.logger.hparams_end(step)
        write_json(self.run_dir / "heated_metrics.json", {"step": step, "algo": self.cfg.algo, **figures,
                                                           **diagnostics})

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically, keeping the previous one as ``checkpoint.prev.pt``."""
        state = {
            "core": self.core.state_dict(),
            "agent": self.agent.state_dict(),
            "rng": run_rng_state(),
            "config": asdict(self.cfg),
            "metrics_offset": self.logger.offset(),
            "initial_policy": self.initial_policy,
        }
        if self.main:
            write_checkpoint(self.run_dir, state)
        self.checkpoint_pending = False
        barrier()

    def run(self) -> Path:
        """Train to the end; write ``heated.pt``; return the run folder."""
        self.pbar = tqdm(total=self.total_steps, initial=self.core.global_step, disable=not self.main,
                         desc=f"pretrain {self.cfg.algo} ({self.core.dev.precision})", unit="step", dynamic_ncols=True)
        self.window.reset()  # the clocks start with the steps
        self.throughput = Throughput()
        try:
            if not self.done():
                self.agent.learn(self)
        finally:
            self.pbar.close()
            self.pbar = None
        if self.main:
            self._report_heated()
            env = self.cfg.env
            save_heated(self.run_dir / "heated.pt", self.core.classifier, env.classifier, self.core.num_classes,
                        self.core.in_channels, env.image_size, self.core.data.class_names,
                        meta={"algo": self.cfg.algo, "dataset": env.dataset, "steps": self.core.global_step,
                              **self.last_val})
            self.agent.save_extra(self.run_dir)
        self.logger.close()
        barrier()
        return self.run_dir

    pbar: tqdm | None = None
    checkpoint_pending = False
    """A checkpoint fell due but the agent was mid-rollout; it is written at the agent's next rollout boundary."""


def resolved_options(agent: Agent, given: dict[str, Any]) -> dict[str, Any]:
    """The agent's options with every default resolved: its ``cfg`` dataclass where it has one (as the study's run keys
    read it), else its constructor's defaults updated with the ``given`` options it takes."""
    options = getattr(agent, "cfg", None)
    if is_dataclass(options):
        return asdict(options)
    defaults = {name: p.default for name, p in inspect.signature(type(agent)).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return defaults | {k: v for k, v in given.items() if k in defaults}


def pretrain(cfg: PretrainConfig, resume: bool = False, keep_saved_length: bool = False,
             chosen_env: Collection[str] = ()) -> Path:
    """Run (or resume) one pretraining run; return its folder. Under torchrun, leaves the process group.
    ``chosen_env``: see :class:`PretrainRunner`."""
    try:
        return PretrainRunner(cfg, resume=resume, keep_saved_length=keep_saved_length, chosen_env=chosen_env).run()
    finally:
        shutdown()
