#!/usr/bin/env python
"""Images per second of pretraining with every agent, side by side, as a ratio to plain training (``none``).

    python benchmarks/throughput.py --preset demo          # make demo's setting: smallcnn, 32 px, grid 8, 1 thread
    python benchmarks/throughput.py --preset study         # the README's long study (the same step, more data)
    python benchmarks/throughput.py --preset resnet18      # resnet18, 64 px, grid 16
    python benchmarks/throughput.py --preset paper --device cuda    # resnet50, 224 px, grid 64 (benchmarks/gpu.sh)
    python benchmarks/throughput.py --preset demo --agents none,reinforce --precision bf16

Every agent runs through its own ``learn`` loop, as in a real run: ``act`` -> environment step -> ``observe`` for
ours and the baselines, stable-baselines3's rollout collection and update for ``ppo`` and ``a2c``, with the
registry's environment settings (``reinforce-budget``: the budgeted reward). Only the runner (logging, evaluation,
checkpoints, kept off the clock of the images per second real runs log, but leaving colder caches) is left out:
``--runs`` measures real runs (below). In each of
``--rounds`` rounds, every agent drives a fresh environment core (the same seed, classifier and data) for
``--warmup`` untimed and ``--steps`` timed steps, the agents' order rotated every round, so slow drift of the
machine falls on every agent alike. Figures are medians over rounds, and each ratio is the median of its
per-round ratios to ``none``; "fastest rounds" divides ``none``'s fastest round by the agent's (interference from
the rest of the machine only ever adds time, so on a busy machine this is the steadier estimate of what a step
costs); ``--interleave`` instead keeps one core and agent per agent and runs the rounds as short blocks of each in
turn, seconds apart (our agents and the baselines only). Epoch starts (a new loader iterator) are left out of the
timed steps. Within a step, the environment step (mask, classifier forward, backward and update, next batch) is
timed apart, so "agent share" is the part of a step that only the agent costs (on CUDA, timed with CUDA events).
Where the REINFORCE agents' policy update runs beside the classifier's step (``--overlap``,
``agents.reinforce.spare_core``), the agent share is what the main thread spends on the agent: ``act`` and any wait
for the update.

``--runs N`` instead runs N steps of a real pretraining run per agent and round (``agents.runner.pretrain``: logging
every 10 steps with the policy diagnostics, image grids every 100, evaluation at every epoch end, checkpoints) into a
temporary folder, and reports the median of the ``perf/images_per_second`` each run logged, and its ratio to the
same round's ``none``. Runs minutes apart differ by more than the agents do on a drifting machine; ``--runs N
--interleave`` keeps one real run per agent (``agents.runner.PretrainRunner``, with all its bookkeeping) and drives
them in turn, ``--warmup`` steps each and then per round a block of N steps of every run (the order rotated), with
each run's logging-window clock paused while the others step; a round's figure for a run is the images per second
of the windows it logged in its block (their images over their clocks' seconds), the same windows
``perf/images_per_second`` reports. Every step of a block is timed, the first after the switch from another run (cold
caches) included, so the heavier agents' figures are if anything low, unless ``--cold-steps K`` leaves the windows of
each block's first K steps out (a real run has no such switch). The runs share the global random generator, so
their masks differ from solo runs', and the ``perf/overhead`` they log counts the other runs' blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.base import Agent  # noqa: E402
from agents.registry import AGENTS, environment_for, make_agent  # noqa: E402
from agents.reinforce import Reinforce, on_update_thread  # noqa: E402
from agents.runner import PretrainConfig, PretrainRunner, pretrain  # noqa: E402
from agents.study import StudyConfig  # noqa: E402
from classifiers.data import DataSpec, available_cores, load_dataset  # noqa: E402
from classifiers.train import PRECISIONS, resolve_device, resolve_precision  # noqa: E402
from envs.core import EnvConfig, PretrainCore, StepResult  # noqa: E402

_QUICK = StudyConfig.quick()
_SMALL = dict(classifier=_QUICK.classifier, image_size=_QUICK.image_size, batch_size=_QUICK.batch_size,
              grid=_QUICK.grid, blur_kernel=_QUICK.blur_kernel, blur_sigma=_QUICK.blur_sigma, threads=_QUICK.threads)
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(_SMALL, dataset=_QUICK.pretrain_dataset),
    "study": dict(_SMALL, dataset="synthrad?n_train=2000&n_val=300&n_test=600"),
    "resnet18": dict(classifier="resnet18", image_size=64, batch_size=32, grid=16, blur_kernel=13, blur_sigma=6.0,
                     dataset="synthrad?n_train=2048&n_val=16&n_test=16"),
    "paper": dict(classifier="resnet50", image_size=224, batch_size=32, grid=64, blur_kernel=13, blur_sigma=6.0,
                  dataset="synthrad?n_train=2048&n_val=16&n_test=16"),
}
"""Named settings: ``demo`` is ``make demo``'s (``StudyConfig.quick``), ``study`` the README's long study, ``paper``
the paper's classifier, image size and grid."""
DEFAULT_AGENTS = ("none", "uniform-mask", "reinforce", "reinforce-official", "reinforce-budget", "ppo", "a2c")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="resnet18", help="named setting; the options below override it")
    p.add_argument("--classifier", help="smallcnn, resnet18, resnet34 or resnet50")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grid", type=int, help="side G of the noise-mask grid")
    p.add_argument("--blur-kernel", type=int)
    p.add_argument("--blur-sigma", type=float)
    p.add_argument("--dataset", help="dataset specification (epoch starts are untimed)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the preset's, else torch's)")
    p.add_argument("--agents", default=",".join(DEFAULT_AGENTS), help="comma-separated algo names (agents.registry)")
    p.add_argument("--steps", type=int, default=16, help="timed steps per agent and round (a multiple of 8 for ppo and "
                   "a2c, whose rollouts are 8 steps)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, help="untimed steps per agent and round first (default 8; not with --runs "
                   "alone; with --runs and --interleave, per run, a multiple of 10, default 10)")
    p.add_argument("--interleave", action="store_true",
                   help="keep one core and agent per agent and run the rounds as blocks of 1 + STEPS steps of each in "
                   "turn (for a machine that drifts; not for ppo and a2c); with --runs, one real run per agent, "
                   "driven in blocks of --runs steps (a multiple of 10, the runs' logging interval)")
    p.add_argument("--runs", type=int, default=None, metavar="STEPS",
                   help="instead: a real pretraining run of STEPS steps per agent and round (with --interleave: one "
                   "run per agent, stepped STEPS at a time); report its logged images/s")
    p.add_argument("--cold-steps", type=int, default=0, metavar="K",
                   help="with --runs N --interleave: leave the windows that close in each block's first K steps (after "
                   "the switch from another run, cold caches) out of its figure; a multiple of 10, below N")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="the classifier's arithmetic")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--overlap", choices=("auto", "on", "off", "both"), default="auto",
                   help="the REINFORCE agents' policy update on a second thread during the classifier's backward pass "
                   "(auto: where a core is spare, agents.reinforce.spare_core; both: a row on and a row off, not with "
                   "--runs)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 10 if args.runs and args.interleave else 8
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def env_config(args: argparse.Namespace, algo: str) -> EnvConfig:
    """The environment ``algo`` runs in: the benchmark's setting with the registry's settings for the algo."""
    cfg = EnvConfig(dataset=args.dataset, classifier=args.classifier, batch_size=args.batch_size,
                    image_size=args.image_size, grid=args.grid, blur_kernel=args.blur_kernel,
                    blur_sigma=args.blur_sigma, device=args.device, precision=args.precision, workers=args.workers,
                    seed=0)
    return environment_for(algo, cfg)


class Timer:
    """Sums the time of the calls it wraps: the wall clock on a CPU, CUDA events on a GPU (the device's own work)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.events, self.seconds = cuda, [], 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out
        return timed

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            self.seconds += sum(s.elapsed_time(e) / 1000.0 for s, e in self.events)
            self.events = []
        return self.seconds

    def reset(self) -> None:
        self.total()
        self.seconds = 0.0


class StepClock:
    """The part of the pretraining runner an agent's ``learn`` uses: it stops the agent after ``warmup + steps``
    classifier steps and times the last ``steps``, without epoch starts; the environment step is timed apart."""

    run_dir = None  # no files: stable-baselines3 logs nowhere

    def __init__(self, core: PretrainCore, warmup: int, steps: int) -> None:
        self.core, self.warmup, self.total = core, warmup, warmup + steps
        self.cuda = core.dev.cuda
        self.env, self.epoch_starts = Timer(self.cuda), Timer(False)
        core.step = self.env.wrap(core.step)
        core.reset = self.epoch_starts.wrap(core.reset)
        self.start = self.end = 0.0
        self.env_seconds = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def done(self) -> bool:
        return self.core.global_step >= self.total

    def after_step(self, result: StepResult, scalars: dict[str, Any]) -> None:
        if self.core.global_step == self.warmup:
            self.env.reset()
            self.epoch_starts.reset()
            self.start = self._now()
        elif self.core.global_step == self.total:
            self.end = self._now()
            self.env_seconds = self.env.total()

    def save_pending_checkpoint(self, force: bool = False) -> None:
        pass

    @property
    def wall(self) -> float:
        """Seconds of the timed steps, epoch starts excluded."""
        return self.end - self.start - self.epoch_starts.total()


@dataclass
class Timing:
    """Per round: seconds of the timed steps, and of their environment steps."""

    wall: list[float] = field(default_factory=list)
    env: list[float] = field(default_factory=list)


SERIAL = " (serial)"
"""Row-label suffix of a REINFORCE agent measured with its policy update on the main thread (``--overlap both``)."""
OVERLAP = {"auto": None, "on": True, "off": False}
"""``--overlap``'s values as ``Reinforce.overlap`` (with ``both``, the row without ``(serial)`` is ``on``)."""


def rows_for(names: list[str], overlap: str) -> list[str]:
    """The table's rows: the agents, and with ``both`` each REINFORCE agent again as ``<name> (serial)``."""
    if overlap != "both":
        return names
    return [row for n in names for row in ((n, n + SERIAL) if AGENTS[n].factory is Reinforce else (n,))]


def build(args: argparse.Namespace, data: DataSpec, row: str, total: int) -> tuple[PretrainCore, Agent, StepClock]:
    """A row's fresh environment core and agent, bound for ``total`` steps, with the clock that times them."""
    algo = row.removesuffix(SERIAL)
    core = PretrainCore(env_config(args, algo), data=data)
    agent = make_agent(algo, {})
    if isinstance(agent, Reinforce):
        agent.overlap = False if row.endswith(SERIAL) else OVERLAP.get(args.overlap, True)
    clock = StepClock(core, args.warmup, args.steps)
    agent.bind(core, total)
    torch.manual_seed(0)
    core.reset(seed=0)
    return core, agent, clock


def measure(args: argparse.Namespace, data: DataSpec, row: str, timing: Timing) -> None:
    """One round of a row's agent: a fresh core and agent, ``warmup`` untimed then ``steps`` timed steps of its
    learn."""
    _, agent, clock = build(args, data, row, args.warmup + args.steps)
    agent.learn(clock)
    timing.wall.append(clock.wall)
    timing.env.append(clock.env_seconds)


def rotated(items: list, r: int) -> list:
    """``items`` in round ``r``'s order: rotated by ``r``, so every item comes first in turn."""
    return items[r % len(items):] + items[: r % len(items)]


def refuse_own_loop(agent: Agent, row: str) -> None:
    """``--interleave`` stops and resumes an agent's ``act``/step/``observe`` loop in blocks; an agent with its own
    training loop (stable-baselines3's) cannot be, and is refused."""
    if type(agent).learn is not Agent.learn:
        raise SystemExit(f"error: --interleave drives the agents' act/step/observe loop in blocks; {row} has its own "
                         "training loop: leave it out, or measure it without --interleave")


def measure_interleaved(args: argparse.Namespace, data: DataSpec, rows: list[str], timings: dict[str, Timing]) -> None:
    """``--interleave``: one core and agent per row for the whole measurement, ``warmup`` untimed steps each, then per
    round a block of one untimed and ``steps`` timed steps of every row in turn (the order rotated), so the rows'
    blocks are seconds apart and the machine's drift falls on all alike. Agents with their own training loop
    (stable-baselines3's) cannot be stopped and resumed in blocks and are refused."""
    units = []
    for row in rows:
        core, agent, clock = build(args, data, row, args.warmup + args.rounds * (args.steps + 1))
        refuse_own_loop(agent, row)
        clock.total = args.warmup
        agent.learn(clock)
        units.append((row, core, agent, clock))
    for r in range(args.rounds):
        for row, core, agent, clock in rotated(units, r):
            clock.warmup = core.global_step + 1
            clock.total = clock.warmup + args.steps
            agent.learn(clock)
            timings[row].wall.append(clock.wall)
            timings[row].env.append(clock.env_seconds)


def logged_images_per_second(args: argparse.Namespace, algo: str, steps: int, folder: Path) -> list[float]:
    """The ``perf/images_per_second`` windows a real pretraining run of ``steps`` steps logged (over as many epochs as
    that takes, with their epoch-end evaluations, as in a real run; those stay off the logged clock)."""
    run_dir = folder / algo
    pretrain(PretrainConfig(algo=algo, env=env_config(args, algo), epochs=steps, max_steps=steps,
                            run_dir=str(run_dir)))
    return [per_second for _, per_second in logged_windows(run_dir / "metrics.jsonl")]


def logged_windows(metrics: Path, offset: int = 0) -> list[tuple[int, float]]:
    """``(step, perf/images_per_second)`` of each logging window a run's ``metrics.jsonl`` holds from byte
    ``offset`` on."""
    rows = [json.loads(line) for line in metrics.read_bytes()[offset:].splitlines()]
    return [(r["step"], r["perf/images_per_second"]) for r in rows if "perf/images_per_second" in r]


class RunBlocks:
    """One agent's real pretraining run (``agents.runner.PretrainRunner``: logging, diagnostics, image grids,
    evaluation, checkpoints), driven a block of steps at a time: the agent's ``learn`` loop sees this in place of the
    runner and stops at the block's end; between blocks the run's logging-window clock is paused, so the windows it
    logs time its own steps only."""

    def __init__(self, runner: PretrainRunner) -> None:
        self.runner, self.stop = runner, 0
        self.logged_step = runner.core.global_step
        """The step of the last window logged: the next one's steps follow it."""
        self._paused = contextlib.ExitStack()
        self._paused.enter_context(runner.window.paused())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def done(self) -> bool:
        return self.runner.core.global_step >= self.stop or self.runner.done()

    def advance(self, steps: int, untimed: int = 0) -> tuple[int, float]:
        """Run ``steps`` more steps; return the images and the clock seconds of the logging windows that closed in
        them after the first ``untimed`` (``perf/images_per_second`` of each is its images over its seconds; a window
        that began in the previous block, where blocks and windows do not align, counts whole, in this one)."""
        runner = self.runner
        first_timed = runner.core.global_step + untimed
        self.stop = runner.core.global_step + steps
        logged = runner.logger.offset()
        self._paused.close()
        try:
            runner.agent.learn(self)
        finally:
            self._paused.enter_context(runner.window.paused())
            # work the last step left running (the next action's forward pass on the update thread, queued CUDA
            # kernels) ends here, off every run's clock, rather than in the next run's block
            if isinstance(runner.agent, Reinforce):
                on_update_thread(lambda: None).result()
            if runner.core.dev.cuda:
                torch.cuda.synchronize()
        images = seconds = 0.0
        for step, per_second in logged_windows(runner.logger.metrics_path, logged):
            n = (step - self.logged_step) * runner.cfg.env.batch_size * runner.core.world_size
            if step > first_timed:
                images, seconds = images + n, seconds + n / per_second
            self.logged_step = step
        return int(images), seconds


def interleaved_runs(args: argparse.Namespace, names: list[str], folder: Path) -> dict[str, list[float]]:
    """``--runs N --interleave``: a real run per agent, ``warmup`` steps each, then per round a block of N steps of
    every run in turn (the order rotated); per run and round, the images per second of the windows it logged."""
    blocks = {}
    for n in names:
        total = args.warmup + args.rounds * args.runs
        runner = PretrainRunner(PretrainConfig(algo=n, env=env_config(args, n), epochs=total, max_steps=total,
                                               run_dir=str(folder / n)))
        refuse_own_loop(runner.agent, n)
        blocks[n] = RunBlocks(runner)
        if args.warmup:
            blocks[n].advance(args.warmup)
    per_second: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in rotated(names, r):
            images, seconds = blocks[n].advance(args.runs, args.cold_steps)
            per_second[n].append(images / seconds)
    for block in blocks.values():
        block.runner.logger.close()
    return per_second


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.agents.split(",") if n.strip()]
    unknown = [n for n in names if n not in AGENTS]
    if unknown or not names or min(args.steps, args.rounds, args.runs or 1) < 1 or args.warmup < 0:
        print(f"error: agents must be some of {', '.join(sorted(AGENTS))} (got {unknown or names}); steps, rounds "
              "and runs at least 1, warmup 0 or more", file=sys.stderr)
        return 2
    data = load_dataset(args.dataset, image_size=args.image_size)
    device = resolve_device(args.device)
    setting = (f"{args.classifier}, {args.image_size} px, batch {args.batch_size}, grid {args.grid}, blur "
               f"{args.blur_kernel}/{args.blur_sigma}; machine: {describe_machine(device)}, {available_cores()} "
               f"core(s) available; classifier in {resolve_precision(args.precision, device)}; policy update "
               f"overlapped: {args.overlap}")
    if args.runs:
        if args.overlap == "both":
            print("error: --overlap both times bare steps; --runs does not take it (give --overlap auto, on or off)",
                  file=sys.stderr)
            return 2
        every = PretrainConfig.log_every
        if args.interleave and (args.runs % every or args.warmup % every or args.cold_steps % every
                                or not 0 <= args.cold_steps < args.runs):
            print(f"error: --runs {args.runs} --warmup {args.warmup} --cold-steps {args.cold_steps} with --interleave: "
                  f"give multiples of {every}, the runs' logging interval, so that each block's windows are its own, "
                  "and fewer cold steps than --runs",
                  file=sys.stderr)
            return 2
        Reinforce.overlap = OVERLAP[args.overlap]  # the runs build their agents themselves
        with tempfile.TemporaryDirectory() as tmp:
            if args.interleave:
                logged = interleaved_runs(args, names, Path(tmp))
                layout = (f"one real run per agent, {args.warmup} warm-up steps each, then {args.rounds} interleaved "
                          f"blocks of {args.runs} steps of each; logged perf/images_per_second (each block: the images "
                          f"over the clock seconds of the windows it logged after its first {args.cold_steps} steps)")
            else:
                logged = {n: [] for n in names}  # per run: the median of its windows
                for r in range(args.rounds):
                    for n in rotated(names, r):
                        logged[n].append(statistics.median(logged_images_per_second(args, n, args.runs,
                                                                                    Path(tmp) / f"{r}")))
                layout = (f"{args.rounds} rounds of real runs of {args.runs} steps per agent, logged "
                          "perf/images_per_second (each run: the median of its windows)")
        print(f"\npreset {args.preset}: {setting}; {layout}\n")
        print("| agent | images/s, median (min-max) | vs none, median of rounds (min-max) |\n|-|-|-|")
        for n in names:
            ratio = "-"
            if "none" in logged:
                ratios = [a / b for a, b in zip(logged[n], logged["none"])]
                ratio = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            print(f"| {n} | {statistics.median(logged[n]):.1f} ({min(logged[n]):.1f}-{max(logged[n]):.1f}) | {ratio} |")
        return 0

    names = rows_for(names, args.overlap)
    timings = {n: Timing() for n in names}
    if args.interleave:
        measure_interleaved(args, data, names, timings)
    for r in range(args.rounds if not args.interleave else 0):
        for n in rotated(names, r):
            measure(args, data, n, timings[n])
    b, s = args.batch_size, args.steps
    layout = (f"{args.warmup} warm-up steps per agent, then {args.rounds} interleaved blocks of 1 + {s} steps"
              if args.interleave else f"{args.rounds} rounds x {s} steps after {args.warmup} warm-up steps per agent "
              "and round")
    print(f"\npreset {args.preset}: {setting}; {layout}\n")
    print("| agent | images/s | step (ms) | env step (ms) | agent share | vs none (rounds: min-max) | vs none, fastest "
          "rounds |\n|-|-|-|-|-|-|-|")
    for n in names:
        t = timings[n]
        share = statistics.median(1 - e / w for e, w in zip(t.env, t.wall))
        ratio = fastest = "-"
        if "none" in timings:
            ratios = [wn / w for wn, w in zip(timings["none"].wall, t.wall)]
            ratio = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            fastest = f"{min(timings['none'].wall) / min(t.wall):.3f}"
        ips, step_ms = statistics.median(b * s / w for w in t.wall), statistics.median(t.wall) / s * 1000
        env_ms = statistics.median(t.env) / s * 1000
        print(f"| {n} | {ips:.1f} | {step_ms:.1f} | {env_ms:.1f} | {share:.1%} | {ratio} | {fastest} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
