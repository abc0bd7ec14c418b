#!/usr/bin/env python
"""Images per second of pretraining with no mask, a fixed Beta(1, 1) mask and our REINFORCE policy, side by side.

    python benchmarks/throughput.py                  # resnet18, 64 px, batch 32, grid 16, on this machine
    python benchmarks/throughput.py --classifier resnet50 --image-size 224 --grid 64 --device cuda

All agents drive one environment core in one process: the same classifier, optimiser and data stream.
After ``--warmup`` untimed steps each, they are measured in ``--rounds`` rounds of ``--steps`` steps, the
order rotated every round, so slow drift of the machine (other jobs, clocks) falls on every agent alike;
figures are medians over rounds and each ratio is the median of its per-round ratios. Within a step the
agent's ``act`` (policy forward and sampling) and ``observe`` (the policy's update) are timed apart from
the environment step (mask, classifier forward, backward and update, next batch), which gives the
policy's share of a step directly. Epoch ends fall outside the timed steps. On CUDA the parts are timed
with CUDA events, the total with the wall clock.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.base import Agent  # noqa: E402
from agents.registry import make_agent  # noqa: E402
from classifiers.train import PRECISIONS  # noqa: E402
from envs.core import EnvConfig, PretrainCore  # noqa: E402

AGENTS = {
    "none": ("none", {}),
    "uniform-mask": ("uniform-mask", {}),
    "reinforce": ("reinforce", {}),
    "reinforce (official)": ("reinforce", {"objective": "official"}),
}
"""Row name -> (registry name, options)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default="resnet18", help="smallcnn, resnet18, resnet34 or resnet50")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grid", type=int, default=16, help="side G of the noise-mask grid")
    p.add_argument("--blur-kernel", type=int, default=13)
    p.add_argument("--blur-sigma", type=float, default=6.0)
    p.add_argument("--steps", type=int, default=2, help="timed steps per agent and round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per agent before the rounds")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="the classifier's arithmetic")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--n-train", type=int, default=2048, help="synthrad training images (epoch ends are untimed)")
    p.add_argument("--agents", default=",".join(AGENTS), help=f"comma-separated rows out of: {', '.join(AGENTS)}")
    return p.parse_args(argv)


class Clock:
    """Marks in time: the wall clock on a CPU, CUDA events on a GPU (they time the device's own work)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds per timed block (one per round) and per step part, summed over a block."""

    wall: list[float] = field(default_factory=list)
    act: list[float] = field(default_factory=list)
    env: list[float] = field(default_factory=list)
    observe: list[float] = field(default_factory=list)


def run_steps(agent: Agent, core: PretrainCore, steps: int, clock: Clock, timing: Timing | None) -> None:
    """``steps`` steps of act -> environment step -> observe; recorded into ``timing`` unless it is None."""
    marks = []
    clock.sync()
    start = time.perf_counter()
    for _ in range(steps):
        if core.exhausted:  # an epoch end (a new loader iterator) is no part of a step: keep it out of the timing
            clock.sync()
            paused = time.perf_counter()
            core.reset()
            clock.sync()
            start += time.perf_counter() - paused
        m0 = clock.mark()
        action = agent.act(core.images)
        m1 = clock.mark()
        result = core.step(grid=action.grid, perturb=action.perturb)
        m2 = clock.mark()
        agent.observe(result)
        marks.append((m0, m1, m2, clock.mark()))
    clock.sync()
    wall = time.perf_counter() - start
    if timing is not None:
        timing.wall.append(wall)
        timing.act.append(sum(clock.seconds(a, b) for a, b, _, _ in marks))
        timing.env.append(sum(clock.seconds(b, c) for _, b, c, _ in marks))
        timing.observe.append(sum(clock.seconds(c, d) for _, _, c, d in marks))


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
    if unknown or not names or min(args.steps, args.rounds) < 1 or args.warmup < 0:
        print(f"error: agents must be some of {', '.join(AGENTS)} (got {unknown or names}); steps and rounds at "
              "least 1, warmup 0 or more", file=sys.stderr)
        return 2
    dataset = f"synthrad?n_train={args.n_train}&n_val=16&n_test=16"
    cfg = EnvConfig(dataset=dataset, classifier=args.classifier, batch_size=args.batch_size,
                    image_size=args.image_size, grid=args.grid, blur_kernel=args.blur_kernel,
                    blur_sigma=args.blur_sigma, device=args.device, precision=args.precision, workers=args.workers)
    core = PretrainCore(cfg)
    core.reset(seed=0)
    clock = Clock(core.dev.device)
    total = args.warmup + args.rounds * args.steps
    agents: dict[str, Agent] = {}
    for name in names:
        algo, options = AGENTS[name]
        agents[name] = make_agent(algo, options)
        agents[name].bind(core, total)
    for name in names:
        run_steps(agents[name], core, args.warmup, clock, None)
    timings = {name: Timing() for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            run_steps(agents[name], core, args.steps, clock, timings[name])

    b, n = args.batch_size, args.steps
    classifier_params = sum(p.numel() for p in core.classifier.parameters())
    print(f"\n{args.classifier}, {args.image_size} px, batch {b}, grid {args.grid}, blur {args.blur_kernel}/"
          f"{args.blur_sigma}; {args.rounds} rounds x {n} steps after {args.warmup} warm-up steps per agent")
    print(f"machine: {describe_machine(core.dev.device)}; classifier in {core.dev.precision}")
    print(f"classifier parameters: {classifier_params:,}")
    for name, agent in agents.items():
        if hasattr(agent, "policy"):
            print(f"policy parameters ({name}): {sum(p.numel() for p in agent.policy.parameters()):,}")
            break
    print("\n| agent | images/s | step (ms) | act (ms) | env step (ms) | observe (ms) | agent share | vs none |")
    print("|-|-|-|-|-|-|-|-|")
    for name in names:
        t = timings[name]
        ips = statistics.median(b * n / w for w in t.wall)
        parts = [statistics.median(x) / n * 1000 for x in (t.act, t.env, t.observe)]
        share = statistics.median((a + o) / (a + e + o) for a, e, o in zip(t.act, t.env, t.observe))
        ratio = (f"{statistics.median(tn / tw for tn, tw in zip(timings['none'].wall, t.wall)):.3f}"
                 if "none" in timings else "-")
        print(f"| {name} | {ips:.1f} | {statistics.median(t.wall) / n * 1000:.1f} | {parts[0]:.2f} | "
              f"{parts[1]:.1f} | {parts[2]:.2f} | {share:.1%} | {ratio} |")
    if "none" in timings and "reinforce" in timings:
        ratios = [tn / tr for tn, tr in zip(timings["none"].wall, timings["reinforce"].wall)]
        print(f"\nratio reinforce / none (images per second): {statistics.median(ratios):.3f} "
              f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)}); target 0.90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
