#!/usr/bin/env python
"""Where each agent's time goes in a real pretraining run: per part, in ms per step and as a share of the step.

Each agent runs a real pretraining run (``agents.runner.PretrainRunner(...).run()``, the runner's own
``log_every``, ``image_every``, ``ckpt_every`` and epoch-end evaluation) into a temporary folder under /tmp, by
default in a fresh process per agent (one after another), so no agent inherits another's warm caches.

How time is attributed: the functions that make up each part are wrapped, for the run, with wall-clock timers
(``time.perf_counter``) that keep a stack, so every part gets its *exclusive* time (its own time minus that of the
timed parts it calls) and the rows of a table add up to the whole ``agent.learn`` loop; what no timer covers is
the row ``learn loop (untimed rest)``. A part called inside another is labelled ``phase / part`` with its nearest
enclosing phase (``act``, ``env step``, ``observe``, ``classifier step``, ``SB3 train`` ...), so the same function
is told apart by who calls it (``classifier step / backward`` vs ``observe / backward``). Inside the runner's
bookkeeping (``_log_window``, ``_log_images``, ``_evaluate``, ``checkpoint``) nested calls are not split out
(the policy forward of the diagnostics is bookkeeping), except the logger's writes and the diagnostics
themselves. Timers instead of cProfile: cProfile charges every Python call (the optimiser's and the
distributions' many small ones most), which inflates the Python-heavy parts against the tensor-heavy ones; a
timer costs about a microsecond per timed call and that overhead is printed. On a GPU the timers would charge
asynchronous work to whoever synchronises; on a CPU, as here, every part's time is its own.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --preset demo              # all agents, the demo run
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --preset demo --rounds 3   # 3 runs each, medians
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --preset paper --agents none,reinforce --steps 4
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --preset study --steps 200

Presets: ``demo`` (``agents.study.StudyConfig.quick()``'s pretraining run: smallcnn, 32 px, batch 32, grid 8,
blur 7/3.0, synthrad?n_train=1280&n_val=120&n_test=240, 3 epochs = 120 steps), ``study`` (the README's long
study: synthrad?n_train=2000&n_val=300&n_test=600, 20 epochs, otherwise the same; ``--steps`` cuts it),
``paper`` (resnet50, 224 px, grid 64, blur 13/6.0, batch 32, on a small synthrad so a few steps reach an epoch
end; the end-of-run heated-model report is skipped unless ``--end``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import OVERLAP  # noqa: E402
from throughput import PRESETS as THROUGHPUT_PRESETS  # noqa: E402

import agents.reinforce  # noqa: E402
import envs.core  # noqa: E402
from agents.runner import PretrainConfig, PretrainRunner  # noqa: E402
from agents.study import StudyConfig  # noqa: E402
from classifiers.data import available_cores  # noqa: E402
from classifiers.train import PRECISIONS  # noqa: E402
from envs.core import EnvConfig  # noqa: E402

AGENTS = ("none", "uniform-mask", "gaussian-noise", "random-erasing", "reinforce", "reinforce-official",
          "reinforce-budget", "ppo", "a2c")
PAPER_AGENTS = ("none", "reinforce", "reinforce-official")
PRESETS = ("demo", "study", "paper")
LOOP = "learn loop (untimed rest)"
UPDATE_THREAD = "update thread"
"""Label prefix of the parts timed on the policy-update thread (beside the main loop, so outside its total)."""
CATEGORIES = (
    ("update thread: the policy update and the next batch's policy forward, beside the classifier step (not in the "
     "total)",
     lambda x: x.startswith(UPDATE_THREAD)),
    ("data (next batch: sampler, fork_rng, collate, augmentation)",
     lambda x: x.endswith("data (next batch)") or "RandomResizedCrop" in x),
    ("  of which per-image RandomResizedCrop + flip", lambda x: "RandomResizedCrop" in x),
    ("agent's augmentation / additive noise", lambda x: "augmentation (per-image" in x or "additive perturbation" in x),
    ("mask operator (grid -> upsample -> blur -> multiply)", lambda x: "mask operator" in x),
    ("classifier step (forward, backward, SGD)", lambda x: x.startswith("classifier step")),
    ("reward forward (no-grad, eval/reference)", lambda x: x.startswith("reward forward")),
    ("env step, rest (normalise, reward, bookkeeping)", lambda x: x in ("env step", "env step / normalise")),
    ("act: policy forward + Beta sampling (+ checks)", lambda x: x.startswith("act")),
    ("observe: log-prob, entropy, backward, clip, update, stats (overlapped: the wait for the update)",
     lambda x: x.startswith("observe")),
    ("SB3: rollout (policy forward, sampling, buffer, GAE, conversions)",
     lambda x: x.startswith(("SB3 collect", "VecEnv", "SB3 per-step", "SB3 rollout boundary")) or "dump_logs" in x),
    ("SB3: train (minibatches, evaluate_actions, backward, Adam/RMSprop)", lambda x: x.startswith("SB3 train")),
    ("runner: per-step scalar recording (after_step, ScalarWindow.add, tqdm)", lambda x: x.startswith("after_step")),
    ("runner: _log_window (means, logger writes, diagnostics)", lambda x: x.startswith("_log_window")),
    ("  of which policy diagnostics", lambda x: x == "_log_window / policy diagnostics"),
    ("runner: _log_images", lambda x: x.startswith("_log_images")),
    ("runner: _evaluate (epoch-end validation)", lambda x: x.startswith("_evaluate")),
    ("runner: checkpoint writing", lambda x: x.startswith("checkpoint")),
    ("loop, untimed rest", lambda x: x == LOOP),
)
"""Parts of the brief, as groups of timed labels (``of which`` rows are inside the row above them)."""


def run_config(preset: str, algo: str, steps: int | None, seed: int, run_dir: str,
               precision: str | None = None) -> PretrainConfig:
    """The pretraining run of ``algo`` at ``preset``, cut at ``steps`` (None: the preset's own length), the classifier
    in ``precision`` (None: the preset's)."""
    if preset in ("demo", "study"):
        study = StudyConfig.quick()
        if preset == "study":
            study = dataclasses.replace(study, pretrain_dataset=THROUGHPUT_PRESETS["study"]["dataset"],
                                        pretrain_epochs=20)
        cfg = study.pretrain_config(algo, seed, Path(run_dir))
    else:
        paper = {k: v for k, v in THROUGHPUT_PRESETS["paper"].items() if k not in ("dataset", "threads")}
        env = EnvConfig(dataset="synthrad?n_train=256&n_val=64&n_test=64", seed=seed, precision="fp32", **paper)
        cfg = PretrainConfig(algo=algo, env=env, epochs=1, run_dir=run_dir)
    if steps is not None:
        cfg.max_steps = steps
        # enough epochs for the steps asked for (max_steps then ends the run; the StepLR period stays the preset's)
        cfg.epochs = max(cfg.epochs, steps)
    if precision is not None:
        cfg.env = dataclasses.replace(cfg.env, precision=precision)
    return cfg


class Timers:
    """Exclusive wall-clock time per labelled part, from a stack of wrapped calls (module docstring). Each thread keeps
    its own stack; the parts timed on another thread than the one that made the timers (the REINFORCE agents' policy
    update, overlapped with the classifier's step) are labelled ``UPDATE_THREAD / part``."""

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self.local = threading.local()
        self.self_time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = True

    def _state(self) -> Any:
        """This thread's stack ([label, time spent in timed children]), phases, absorbing depth, and whether it is
        another thread than the owner's."""
        state = self.local
        if not hasattr(state, "stack"):
            state.stack, state.phases, state.absorbing = [], [], 0
            state.worker = threading.get_ident() != self.owner
        return state

    def wrap(self, fn, name: str, phase: bool = False, absorb: bool = False, always: bool = False):
        """``fn`` timed as ``name``. ``phase``: parts inside are labelled ``name / part``. ``absorb``: timed parts
        inside are not split out (except those wrapped with ``always``)."""
        timers = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            state = timers._state()
            if not timers.active or (state.absorbing and not always):
                return fn(*args, **kwargs)
            label = name if phase or not state.phases else f"{state.phases[-1]} / {name}"
            if state.worker:
                label = f"{UPDATE_THREAD} / {label}"
            frame = [label, 0.0]
            state.stack.append(frame)
            if phase:
                state.phases.append(name)
            if absorb:
                state.absorbing += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                if absorb:
                    state.absorbing -= 1
                if phase:
                    state.phases.pop()
                state.stack.pop()
                timers.self_time[label] += elapsed - frame[1]
                timers.calls[label] += 1
                if state.stack:
                    state.stack[-1][1] += elapsed

        return timed

    def patch(self, obj: Any, attr: str, name: str, **kw: Any) -> None:
        setattr(obj, attr, self.wrap(getattr(obj, attr), name, **kw))


def overhead_per_call() -> float:
    """Seconds a timer adds to one call (measured on a no-op)."""
    t = Timers()
    noop = t.wrap(lambda: None, "x", phase=True)
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        noop()
    timed = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        (lambda: None)()
    return max(0.0, (timed - (time.perf_counter() - start)) / n)


def instrument(t: Timers, runner: PretrainRunner) -> None:
    """Wrap the parts of a run (module docstring) for this process."""
    from torch.distributions import Beta
    from tqdm import tqdm

    import agents.runner as runner_mod

    core, agent = runner.core, runner.agent
    # the classifier step and what surrounds it in the environment
    t.patch(core, "step", "env step", phase=True)
    t.patch(core, "_fetch", "data (next batch)")
    t.patch(core.loader.dataset, "augment", "data: per-image RandomResizedCrop + flip")
    t.patch(core, "_normalised", "normalise")
    t.patch(core, "_masked", "additive perturbation (perturb)")
    t.patch(core.mask, "apply", "mask operator (grid -> upsample -> blur -> multiply)")
    t.patch(core, "_score", "reward forward (no-grad, eval/reference)", phase=True, absorb=True)
    t.patch(envs.core, "supervised_step", "classifier step", phase=True)
    t.patch(core.classifier, "forward", "forward")
    t.patch(core.optimizer, "step", "SGD step")
    t.patch(torch.Tensor, "backward", "backward")
    # the agent
    t.patch(agent, "learn", LOOP, phase=True)
    t.patch(agent, "act", "act", phase=True)
    t.patch(agent, "observe", "observe", phase=True)
    if hasattr(agent, "_each"):
        t.patch(agent, "_each", "augmentation (per-image torchvision loop)")
    t.patch(Beta, "rsample", "Beta sampling")
    t.patch(Beta, "log_prob", "log-probabilities")
    t.patch(Beta, "entropy", "entropy")
    t.patch(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    if hasattr(agent, "sampler"):  # our REINFORCE
        t.patch(agent.sampler, "forward", "policy forward")
        t.patch(agent.policy, "head_output", "policy trunk + head")  # on the update thread when computed ahead
        t.patch(agent.sampler, "concentrations", "policy concentrations")  # likewise
        t.patch(agent.optimizer, "step", "optimiser step")
        t.patch(type(agent.scheduler), "step", "lr schedule step")  # on the class: an instance attribute would
        # land in the scheduler's state_dict (its __dict__) and break the checkpoint
        t.patch(agents.reinforce, "check_finite", "finiteness checks")
        t.patch(agents.reinforce, "sample_mask", "Beta sampling")  # from its own generator: not through Beta.rsample
        t.patch(agent, "_update", "policy update")
    if hasattr(agent, "model") and hasattr(agent, "venv"):  # stable-baselines3
        model = agent.model  # its methods patched on the class: stable-baselines3 pickles the instance's __dict__
        t.patch(type(model), "collect_rollouts", "SB3 collect_rollouts (obs/action conversions)", phase=True)
        t.patch(type(model), "train", "SB3 train", phase=True)
        t.patch(type(model), "dump_logs", "SB3 dump_logs")
        t.patch(model.rollout_buffer, "add", "rollout buffer add")
        t.patch(model.rollout_buffer, "get", "minibatch sampling (buffer.get)")
        t.patch(model.rollout_buffer, "compute_returns_and_advantage", "GAE returns")
        t.patch(model.policy, "forward", "policy forward")
        t.patch(model.policy, "predict_values", "value forward (predict_values)")
        t.patch(model.policy, "evaluate_actions", "evaluate_actions (forward)")
        t.patch(model.policy.optimizer, "step", "optimiser step")
        t.patch(agent.venv, "step_wait", "VecEnv step_wait (tensor <-> numpy)", phase=True)
        t.patch(agent.venv, "on_step", "SB3 per-step policy statistics (_on_env_step)", phase=True)  # bound at bind
        t.patch(agent, "rollout_boundary", "SB3 rollout boundary (finite check, pending checkpoint)", phase=True)
    # the runner's bookkeeping
    t.patch(runner, "after_step", "after_step (per-step scalar recording)", phase=True)
    t.patch(runner.window, "add", "ScalarWindow.add")
    t.patch(tqdm, "update", "progress bar")
    t.patch(runner, "_log_window", "_log_window", phase=True, absorb=True)
    t.patch(runner, "diagnostics", "policy diagnostics", always=True)
    t.patch(runner, "_log_images", "_log_images", phase=True, absorb=True)
    t.patch(runner, "_evaluate", "_evaluate (validation pass)", phase=True, absorb=True)
    t.patch(runner, "save_checkpoint", "checkpoint", phase=True, absorb=True)
    t.patch(runner_mod, "write_checkpoint", "write_checkpoint (torch.save)", always=True)
    for method in ("scalars", "images", "histogram"):
        t.patch(runner.logger, method, "logger writes (TensorBoard, metrics.jsonl)", always=True)
    # the end of the run, outside the loop
    t.patch(runner, "_report_heated", "end of run: heated-model report", phase=True, absorb=True)


def profile_one(args: argparse.Namespace, algo: str) -> dict[str, Any]:
    """One agent's run under the timers; its table as a dict."""
    torch.set_num_threads(1)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    run_dir = tempfile.mkdtemp(prefix=f"profile-{algo}-", dir="/tmp")
    try:
        cfg = run_config(args.preset, algo, args.steps, args.seed, run_dir, args.precision)
        start = time.perf_counter()
        runner = PretrainRunner(cfg)
        setup = time.perf_counter() - start
        t = Timers()
        instrument(t, runner)
        if not args.end:
            runner._report_heated = lambda: None
        in_loop: dict[str, float] = {}
        loop_calls: dict[str, int] = {}
        learn = runner.agent.learn

        def learn_and_snapshot(r):
            learn(r)
            in_loop.update(t.self_time)
            loop_calls.update(t.calls)

        runner.agent.learn = learn_and_snapshot
        start = time.perf_counter()
        runner.run()
        whole = time.perf_counter() - start
        t.active = False
        steps = runner.core.global_step
        loop = sum(v for k, v in in_loop.items() if not k.startswith(UPDATE_THREAD))  # that one runs beside it
        after = {k: v - in_loop.get(k, 0.0) for k, v in t.self_time.items() if v - in_loop.get(k, 0.0) > 1e-9}
        logged, overhead = [], []
        metrics = Path(run_dir) / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if "perf/images_per_second" in rec:
                    logged.append((rec.get("step"), rec["perf/images_per_second"]))
                if "perf/overhead" in rec:
                    overhead.append(rec["perf/overhead"])
        return {"algo": algo, "steps": steps, "batch": cfg.env.batch_size, "loop_s": loop, "setup_s": setup,
                "run_s": whole, "parts": in_loop, "calls": loop_calls, "after": after,
                "timed_calls": sum(loop_calls.values()), "logged_ips": logged,
                "logged_overhead": overhead,
                # the runner's own clock: bookkeeping kept off perf/images_per_second (``Throughput``), or not
                "runner_clock": "bookkeeping excluded" if hasattr(runner, "throughput") else "bookkeeping included",
                "precision": runner.core.dev.precision, "env": dataclasses.asdict(cfg.env)}
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def categories(parts: dict[str, float]) -> dict[str, float]:
    """Seconds per part of the brief (:data:`CATEGORIES`); a label counts in the first top-level group it matches."""
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["other"] = 0.0
    for label, secs in parts.items():
        placed = False
        for name, match in CATEGORIES:
            if not match(label):
                continue
            if name.startswith("  of which"):
                out[name] += secs
            elif not placed:
                out[name] += secs
                placed = True
        if not placed:
            out["other"] += secs
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One agent's rounds: medians (ms per step) of every label, group and total."""
    per_step = [{k: 1000 * v / r["steps"] for k, v in r["parts"].items()} for r in runs]
    labels = sorted({k for p in per_step for k in p})
    groups = [{k: 1000 * v / r["steps"] for k, v in categories(r["parts"]).items()} for r in runs]
    ips = [r["steps"] * r["batch"] / r["loop_s"] for r in runs]
    logged = [statistics.mean(v for _, v in r["logged_ips"]) for r in runs if r["logged_ips"]]
    return {
        "algo": runs[0]["algo"], "steps": runs[0]["steps"], "batch": runs[0]["batch"], "rounds": len(runs),
        "labels": {k: _median([p.get(k, 0.0) for p in per_step]) for k in labels},
        "calls": {k: runs[0]["calls"].get(k, 0) for k in labels},
        "groups": {k: _median([g[k] for g in groups]) for k in groups[0]},
        "total": _median([1000 * r["loop_s"] / r["steps"] for r in runs]),
        "totals": [1000 * r["loop_s"] / r["steps"] for r in runs],
        "ips": _median(ips), "logged": _median(logged),
        "timed_calls": runs[0]["timed_calls"],
        "one_off": {"runner construction": _median([r["setup_s"] for r in runs]),
                    **{k: _median([r["after"].get(k, 0.0) for r in runs]) for k in runs[0]["after"]}},
        "windows": runs[-1]["logged_ips"],
        "logged_overhead": _median([statistics.mean(r["logged_overhead"]) for r in runs if r.get("logged_overhead")]),
        "runner_clock": sorted({r.get("runner_clock", "?") for r in runs}),
    }


def print_agent(s: dict[str, Any], overhead: float) -> None:
    total = s["total"]
    rounds = f"median of {s['rounds']} runs ({', '.join(f'{t:.1f}' for t in s['totals'])} ms/step)" \
        if s["rounds"] > 1 else "one run"
    print(f"\n### {s['algo']}: {s['steps']} steps of {s['batch']} images, {rounds}: {total:.1f} ms/step, "
          f"{s['ips']:.0f} images/s over agent.learn (timers included; their overhead about "
          f"{1000 * overhead * s['timed_calls'] / s['steps']:.2f} ms/step); logged perf/images_per_second, mean of "
          f"the windows: {s['logged']:.0f} (runner clock: {', '.join(s['runner_clock'])}"
          + (f"; logged perf/overhead, mean of the windows: {s['logged_overhead']:.1%}" if s["logged_overhead"] else "")
          + ")\n")
    print("| part | ms per step | share of the step |\n|-|-|-|")
    for name, ms in s["groups"].items():
        if ms > 0 or not name.startswith("  "):
            print(f"| {name} | {ms:.2f} | {ms / total:.1%} |")
    print(f"| **total (agent.learn)** | {total:.2f} | 100% |")
    print("\n<details><summary>every timed label (exclusive ms per step, calls in the first run)</summary>\n")
    print("| label | ms per step | share | calls |\n|-|-|-|-|")
    for label, ms in sorted(s["labels"].items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {ms:.3f} | {ms / total:.1%} | {s['calls'][label]} |")
    print("\n</details>\n")
    print("One-off, outside the loop (s): " + "; ".join(f"{k} {v:.2f}" for k, v in s["one_off"].items()))
    if s["windows"]:
        print("Logged windows of the last run (step: images/s): " +
              ", ".join(f"{st}: {v:.0f}" for st, v in s["windows"]))


def print_summary(summaries: list[dict[str, Any]]) -> None:
    ref = next((s for s in summaries if s["algo"] == "none"), None)
    names = [s["algo"] for s in summaries]
    print("\n### All agents: ms per step by part\n")
    print("| part | " + " | ".join(names) + " |\n|-|" + "-|" * len(names))
    for name in summaries[0]["groups"]:
        print(f"| {name} | " + " | ".join(f"{s['groups'][name]:.2f}" for s in summaries) + " |")
    print("| **total** | " + " | ".join(f"**{s['total']:.1f}**" for s in summaries) + " |")
    print("\n| agent | ms/step | images/s | vs none | logged images/s (mean of windows) | vs none |\n|-|-|-|-|-|-|")
    for s in summaries:
        vs = f"{s['ips'] / ref['ips']:.2f}x" if ref else "-"
        vsl = f"{s['logged'] / ref['logged']:.2f}x" if ref and ref["logged"] else "-"
        print(f"| {s['algo']} | {s['total']:.1f} | {s['ips']:.0f} | {vs} | {s['logged']:.0f} | {vsl} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=PRESETS)
    p.add_argument("--agents", default=None, help=f"comma-separated (default: all; paper: {','.join(PAPER_AGENTS)})")
    p.add_argument("--steps", type=int, default=None,
                   help="classifier steps per run (default: demo 120 = its 3 epochs, study 200, paper 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="runs per agent, interleaved; medians are reported")
    p.add_argument("--end", action=argparse.BooleanOptionalAction, default=None,
                   help="include the end-of-run heated-model report (default: yes, except paper)")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) in every run (a test: is a part slow on subnormal floats?)")
    p.add_argument("--keep", action="store_true", help="keep the run folders under /tmp")
    p.add_argument("--overlap", choices=tuple(OVERLAP), default="auto",
                   help="the REINFORCE agents' policy update on a second thread beside the classifier's step (auto: "
                   "where a core is spare, agents.reinforce.spare_core; under taskset -c 1, off)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the classifier's precision (default: the preset's; demo and study: auto, paper: fp32)")
    p.add_argument("--in-process", action="store_true", help="run every agent in this process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = {"demo": None, "study": 200, "paper": 4}[args.preset]
    if args.end is None:
        args.end = args.preset != "paper"
    torch.set_num_threads(1)
    agents.reinforce.Reinforce.overlap = OVERLAP[args.overlap]
    if args.child:
        print("PROFILE_JSON " + json.dumps(profile_one(args, args.child)))
        return 0
    algos = (args.agents or ",".join(PAPER_AGENTS if args.preset == "paper" else AGENTS)).split(",")
    overhead = overhead_per_call()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"preset {args.preset}, steps {args.steps or 'the preset run'}, {cpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"{available_cores()} core(s) available, policy update overlapped: {args.overlap}")
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in algos}
    for round_ in range(args.rounds):  # interleaved, so slow drift of the machine falls on every agent alike
        for algo in algos:
            if args.in_process:
                res = profile_one(args, algo)
            else:
                cmd = [sys.executable, __file__, "--child", algo, "--preset", args.preset, "--seed", str(args.seed),
                       "--overlap", args.overlap, "--end" if args.end else "--no-end"] \
                    + (["--flush-denormal"] if args.flush_denormal else []) \
                    + (["--precision", args.precision] if args.precision else []) \
                    + (["--steps", str(args.steps)] if args.steps else []) + (["--keep"] if args.keep else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE_JSON ")]
                if proc.returncode or not lines:
                    print(f"\n### {algo}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
                    continue
                res = json.loads(lines[-1][len("PROFILE_JSON "):])
            if not any(runs.values()):
                env = res["env"]
                print(f"{env['classifier']}, {env['image_size']} px, batch {env['batch_size']}, grid {env['grid']}, "
                      f"blur {env['blur_kernel']}/{env['blur_sigma']}, {env['dataset']}, {res['precision']}")
            print(f"round {round_ + 1}: {algo} {1000 * res['loop_s'] / res['steps']:.1f} ms/step", flush=True)
            runs[algo].append(res)
    summaries = [summarise(r) for r in runs.values() if r]
    for s in summaries:
        print_agent(s, overhead)
    if summaries:
        print_summary(summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
