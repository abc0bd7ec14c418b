#!/usr/bin/env python
"""How ``--lr auto`` was designed: how well short trials and a range test pick the rate full runs prefer.

    python benchmarks/finetune_lr.py --heated H --out runs/lr-auto --rates 0.02 0.05 0.1 0.2   # the full runs first
    python benchmarks/lr_search_design.py --heated H --out runs/lr-auto                       # then this

For every target, start and seed of ``benchmarks/finetune_lr.py`` (same ``--out``, whose fixed-rate runs must exist):

- the search of ``lr auto`` alone (``Finetuner.search_rate``) with each of ``--budgets`` steps per candidate;
- a learning-rate range test (Smith 2017, as fastai's and Lightning's ``lr_find``): the rate grows exponentially from
  1e-3 to 10 over ``--range-steps`` steps of the run's optimiser, the training loss is smoothed (exponential average,
  0.98, bias-corrected) and the test stops once it exceeds 4 times its minimum; its three usual suggestions are read
  off: ``min/10`` (a tenth of the rate at the minimum), ``steepest`` (the steepest descent before the minimum) and
  ``valley`` (fastai's default), each taken to the nearest rate of the grid.

Each pick is scored by the full runs at the picked rate (their last epoch): ``val regret`` is the best full run's
validation accuracy minus the picked one's, ``val-best`` how often the pick is the full runs' best on validation,
and ``test vs fixed`` the picked run's test accuracy minus the fixed default's (``DEFAULT_LR``). ``full runs`` picks
the best of the full runs on validation (the search at the whole run's length: as many full runs as candidates).
Trials (per budget) and range tests are cached in ``--out`` (``search_trials.jsonl``, ``range_tests.jsonl``; remove
the latter after changing ``--range-steps``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from finetune_lr import TARGETS, folder  # noqa: E402

from classifiers.finetune import AUTO_CANDIDATES, DEFAULT_LR, FinetuneConfig, Finetuner  # noqa: E402
from classifiers.train import NonFiniteError, supervised_step  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heated", required=True, help="the heated.pt of the heated start, as for finetune_lr.py")
    p.add_argument("--out", default="runs/lr-auto", help="finetune_lr.py's folder")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--starts", nargs="+", default=["scratch", "heated"], choices=["scratch", "heated"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=int, nargs="*", default=[20, 40, 80], help="steps per candidate (none: no "
                   "trials)")
    p.add_argument("--range-steps", type=int, default=100, help="steps of the range test (0: none)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--image-size", type=int, default=32)
    return p.parse_args(argv)


def tuner(a: argparse.Namespace, target: str, start: str, seed: int, run_dir: Path) -> Finetuner:
    """The run of finetune_lr.py for (target, start, seed), built (data, model, loaders) but not trained."""
    init = dict(init="scratch", classifier="smallcnn", channels=1) if start == "scratch" else dict(init=a.heated)
    shutil.rmtree(run_dir, ignore_errors=True)
    return Finetuner(FinetuneConfig(**init, image_size=a.image_size, dataset=TARGETS[target].format(out=a.out),
                                    epochs=a.epochs, seed=seed, lr=DEFAULT_LR["scratch"], device="cpu",
                                    precision="fp32", workers=0, run_dir=str(run_dir)))


def range_test(t: Finetuner, steps: int) -> tuple[list[float], list[float]]:
    """Rates and training losses of a range test from the starting model."""
    rates = np.geomspace(1e-3, 10, steps)
    optimizer = torch.optim.SGD(t.model.parameters(), lr=rates[0], momentum=t.cfg.momentum,
                                weight_decay=t.cfg.weight_decay)
    losses: list[float] = []
    for i, (images, labels) in enumerate(itertools.islice(t.training_batches(), steps)):
        for group in optimizer.param_groups:
            group["lr"] = float(rates[i])
        images, labels = t.dev.batch(images, labels)
        try:
            loss, _ = supervised_step(t.net, optimizer, t.normalizer(images), labels, t.dev, step=i + 1)
        except NonFiniteError:
            break
        losses.append(float(loss.mean()))
        if len(losses) > 10 and losses[-1] > 4 * min(losses):
            break
    return rates[: len(losses)].tolist(), losses


def smoothed(losses: list[float], beta: float = 0.98) -> np.ndarray:
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)


def valley(rates: np.ndarray, losses: np.ndarray) -> float:
    """fastai's ``valley``: two thirds down the longest run of decreasing loss."""
    n, start, end = len(losses), 0, 0
    run = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[end] < run[i]:
                end = i
                start = end - run[end]
    third = (end - start) / 3
    return float(rates[start + int(third) + int(third / 2)])


def suggestions(rates: list[float], losses: list[float]) -> dict[str, float]:
    r, s = np.array(rates), smoothed(losses)
    low = int(np.argmin(s))
    steep = r[int(np.argmin(np.gradient(s[: low + 1], np.log(r[: low + 1]))))] if low > 2 else r[0]
    return {"min/10": float(r[low] / 10), "steepest": float(steep), "valley": valley(r, s)}


def nearest(rate: float, grid: list[str]) -> str:
    return min(grid, key=lambda g: abs(math.log(float(g)) - math.log(rate)))


def full_runs(a: argparse.Namespace, target: str, start: str, seed: int, grid: list[str]) -> dict[str, tuple]:
    """Per rate: the fixed-rate run's last validation accuracy and its test accuracy."""
    out = {}
    for rate in grid:
        d = folder(a, target, start, seed, rate)
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        out[rate] = ([r["val/accuracy"] for r in rows if "val/accuracy" in r][-1],
                     json.loads((d / "metrics.json").read_text())["accuracy"])
    return out


def cached(path: Path) -> dict[str, dict]:
    return {json.dumps(r["key"]): r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    grid = [str(r) for r in AUTO_CANDIDATES]
    trials_path, ranges_path = Path(a.out) / "search_trials.jsonl", Path(a.out) / "range_tests.jsonl"
    trials, ranges = cached(trials_path), cached(ranges_path)
    scratch_dir = Path(tempfile.mkdtemp(prefix="lr-design-"))
    picks: dict[str, list[tuple[str, dict, str]]] = {}
    for target, start, seed in itertools.product(a.targets, a.starts, a.seeds):
        full = full_runs(a, target, start, seed, grid)
        fixed = str(DEFAULT_LR[start])
        for b in a.budgets:
            key = json.dumps([target, start, seed, b])
            if key not in trials:
                t = tuner(a, target, start, seed, scratch_dir / "run")
                record = t.search_rate(steps=b)
                t.logger.close()
                trials[key] = {"key": [target, start, seed, b], "search": record}
                with trials_path.open("a") as f:
                    f.write(json.dumps(trials[key]) + "\n")
            picks.setdefault(f"search, {b} steps per candidate", []).append(
                (str(trials[key]["search"]["chosen"]), full, fixed))
        key = json.dumps([target, start, seed])
        if a.range_steps and key not in ranges:
            t = tuner(a, target, start, seed, scratch_dir / "run")
            rates, losses = range_test(t, a.range_steps)
            t.logger.close()
            ranges[key] = {"key": [target, start, seed], "rates": rates, "losses": losses}
            with ranges_path.open("a") as f:
                f.write(json.dumps(ranges[key]) + "\n")
        for name, rate in (suggestions(ranges[key]["rates"], ranges[key]["losses"]) if a.range_steps else {}).items():
            picks.setdefault(f"range test, {name}", []).append((nearest(rate, grid), full, fixed))
        picks.setdefault("full runs, best on validation", []).append((max(grid, key=lambda r: full[r][0]), full,
                                                                      fixed))
    shutil.rmtree(scratch_dir, ignore_errors=True)
    print(f"{len(a.targets)} targets x {len(a.starts)} starts x seeds {' '.join(map(str, a.seeds))}; grid "
          f"{', '.join(grid)}; fixed default: DEFAULT_LR {DEFAULT_LR}\n")
    print("| pick | val regret | val-best | test vs fixed |\n|-|-|-|-|")
    for name, rows in picks.items():
        regret = statistics.fmean(max(v for v, _ in full.values()) - full[p][0] for p, full, _ in rows)
        best = sum(full[p][0] == max(v for v, _ in full.values()) for p, full, _ in rows)
        gain = statistics.fmean(full[p][1] - full[fixed][1] for p, full, fixed in rows)
        print(f"| {name} | {regret:.4f} | {best}/{len(rows)} | {gain:+.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
