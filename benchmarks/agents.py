#!/usr/bin/env python
"""Images per second and peak memory of pretraining with each agent, on the same classifier and data.

Every agent drives its own fresh copy of the same environment (same seed, same data) for
``--warmup`` untimed steps and ``--steps`` timed ones, in one process, in interleaved rounds (the
median is reported), so the ratios compare like with like. ``none`` (plain training) is the
reference. Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the agent's run; on a
CPU (Linux), the growth of the peak resident set (``VmHWM``, reset before the agent is built) over the
resident set before, measured in a fresh process per agent so no agent reuses memory another freed.

    python benchmarks/agents.py                                   # smallcnn, 64 px, batch 32
    python benchmarks/agents.py --classifier resnet18 --steps 48
    python benchmarks/agents.py --profile ppo                     # where PPO's time goes
    python benchmarks/agents.py --policy-width 32                 # a heavier policy for every agent
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import StepClock  # noqa: E402

from agents.registry import make_agent  # noqa: E402
from classifiers.data import DataSpec, load_dataset  # noqa: E402
from classifiers.train import PRECISIONS, resolve_device, resolve_precision  # noqa: E402
from envs.core import EnvConfig, PretrainCore  # noqa: E402

ALGOS = ("none", "reinforce", "ppo", "a2c")

PROFILE_PARTS: dict[str, list[tuple[str, str | None]]] = {
    "classifier step (mask, forward, backward, SGD)": [(r"core.py:\d+\(step\)", None)],
    "policy forward and sampling while acting": [(r"policies.py:\d+\(forward\)", None),
                                                 (r"reinforce.py:\d+\(act\)", None)],
    "rollout buffer add (float32 copies of the images)": [(r"buffers.py:\d+\(add\)", None)],
    "GAE returns": [(r"buffers.py:\d+\(compute_returns_and_advantage\)", None)],
    "policy update": [(r"(ppo|a2c).py:\d+\(train\)", None), (r"reinforce.py:\d+\(observe\)", None)],
    "  of which minibatch sampling (buffer.get)": [(r"buffers.py:\d+\(get\)", None)],
    "  of which forward (evaluate_actions)": [(r"policies.py:\d+\(evaluate_actions\)", None)],
    "  of which backward": [(r"_tensor.py:\d+\(backward\)", r"((ppo|a2c).py:\d+\(train\)|\(observe\))")],
    "  of which optimiser step": [(r"(adam|rmsprop).py:\d+\(step\)", None)],
    "action validation": [(r"noise_mask_env.py:\d+\(validate_action\)", None)],
    "stable-baselines3 logging (dump_logs)": [(r"on_policy_algorithm.py:\d+\(dump_logs\)", None)],
}
"""The functions whose cumulative time makes up each part of a profiled run: ``(function, caller)`` regexes
over ``file:line(name)``; with a caller, only the time of calls from matching callers counts."""


def build(args: argparse.Namespace, data: DataSpec, algo: str) -> tuple[PretrainCore, Any, StepClock]:
    """A fresh environment core (seeded) and a bound agent; the agent's options as in ``scripts/pretrain.py``."""
    cfg = EnvConfig(dataset=args.dataset, classifier=args.classifier, batch_size=args.batch_size,
                    image_size=args.image_size, grid=args.grid, device=args.device,
                    precision=args.precision, seed=0)
    core = PretrainCore(cfg, data=data)
    options = {"n_steps": args.n_steps, "n_epochs": args.n_epochs, "sb3_batch_size": args.sb3_batch_size,
               "policy_width": args.policy_width}
    agent = make_agent(algo, options)
    clock = StepClock(core, args.warmup, args.steps)
    agent.bind(core, clock.total)
    torch.manual_seed(0)
    core.reset(seed=0)
    return core, agent, clock


def _status_mib(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (Linux), in MiB."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def measure(args: argparse.Namespace, data: DataSpec, algo: str) -> dict[str, float]:
    """Run one agent for ``warmup + steps`` steps; its images per second over the timed steps and its peak memory:
    on CUDA the peak allocated, on a CPU the peak resident set's growth over the resident set before the agent
    was built (the kernel's high-water mark is reset there)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_before = _status_mib("VmRSS")
    core, agent, clock = build(args, data, algo)
    agent.learn(clock)
    out = {"images_per_second": args.steps * args.batch_size / clock.wall}
    if core.dev.cuda:
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["rss_growth_mib"] = _status_mib("VmHWM") - rss_before
    return out


def child_memory(args: argparse.Namespace, algo: str) -> float:
    """Peak resident-set growth (MiB) of one agent's run, measured in a fresh process."""
    argv = [sys.executable, __file__, "--memory-child", algo, *sys.argv[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["rss_growth_mib"]


def profile(args: argparse.Namespace, data: DataSpec, algo: str) -> None:
    """Where ``algo``'s time goes: cumulative seconds of each part of a run under cProfile."""
    _, agent, clock = build(args, data, algo)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(agent.learn, clock)
    total = time.perf_counter() - start
    funcs = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    print(f"\n{algo}: {clock.total} steps of {args.batch_size} images under cProfile, {total:.2f} s "
          f"({clock.total * args.batch_size / total:.0f} images/s with the profiler's overhead)\n")
    print("| part | seconds | share |\n|-|-|-|")
    def label(key: tuple[str, int, str]) -> str:
        return f"{Path(key[0]).name}:{key[1]}({key[2]})"

    for part, patterns in PROFILE_PARTS.items():
        secs = 0.0
        for key, (_, _, _, cumulative, callers) in funcs.items():
            for func, caller in patterns:
                if re.search(func, label(key)):
                    secs += cumulative if caller is None else \
                        sum(c[3] for k, c in callers.items() if re.search(caller, label(k)))
        print(f"| {part} | {secs:.2f} | {secs / total:.0%} |")
    print(f"| total | {total:.2f} | 100% |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", default=",".join(ALGOS), help="comma-separated agents to compare")
    p.add_argument("--dataset", default="synthrad", help="dataset specification")
    p.add_argument("--classifier", default="smallcnn", help="classifier architecture")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="the classifier's arithmetic")
    p.add_argument("--n-steps", type=int, default=None, help="ppo/a2c rollout length (default: the agents')")
    p.add_argument("--n-epochs", type=int, default=None, help="ppo epochs per rollout (default: the agent's)")
    p.add_argument("--sb3-batch-size", type=int, default=None, help="ppo minibatch (default: the agent's)")
    p.add_argument("--policy-width", type=int, default=None,
                   help="channels of every agent's policy trunk (default: the agents', 16)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (a multiple of n_steps)")
    p.add_argument("--steps", type=int, default=32, help="timed steps (a multiple of n_steps)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--profile", default=None, metavar="ALGO", help="profile one agent instead of comparing")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, image_size=args.image_size)
    if args.memory_child:
        print(json.dumps(measure(args, data, args.memory_child)))
        return 0
    if args.profile:
        profile(args, data, args.profile)
        return 0
    algos = args.algos.split(",")
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in algos}
    for _ in range(args.rounds):
        for algo in algos:
            runs[algo].append(measure(args, data, algo))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    memory = {a: statistics.median(r["peak_mib"] for r in runs[a]) for a in algos} if cuda else \
        {a: child_memory(args, a) for a in algos}
    ips = {a: statistics.median(r["images_per_second"] for r in runs[a]) for a in algos}
    device = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    width = f", policy width {args.policy_width}" if args.policy_width else ""
    device += f", classifier in {resolve_precision(args.precision, resolve_device(args.device))}"
    print(f"\n{args.classifier}, {args.image_size} px, batch {args.batch_size}, grid {args.grid}{width}, {device}; "
          f"median of {args.rounds} rounds of {args.steps} steps after {args.warmup}\n")
    mem_col = "peak CUDA memory (MiB)" if cuda else "peak RSS growth (MiB)"
    ref = ips.get("reinforce")
    print(f"| agent | images/s | vs reinforce | {mem_col} |\n|-|-|-|-|")
    for a in algos:
        ratio = f"{ips[a] / ref:.2f}x" if ref else "-"
        print(f"| {a} | {ips[a]:.0f} | {ratio} | {memory[a]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
