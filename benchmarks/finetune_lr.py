#!/usr/bin/env python
"""The fine-tuning rate chosen from the data (``--lr auto``) against fixed rates, on synthetic and real-like targets.

    python benchmarks/finetune_lr.py --heated runs/lr-auto/heated/heated.pt --out runs/lr-auto   # runs, then the table
    python benchmarks/finetune_lr.py --heated runs/lr-auto/heated/heated.pt --out runs/lr-auto --table-only

For every target, start (``scratch``, and the ``--heated`` model), seed and rate (each of ``--rates`` and ``auto``)
it runs ``scripts/finetune.py`` once, in turn, one process at a time (start it under ``nice`` with
``OMP_NUM_THREADS=1`` to share a machine). The targets: ``synthrad:unseen`` and ``synthrad:shifted`` (1,200
training, 300 validation, 600 test images), the digits folder (``benchmarks/digits_folder.py``) and the brain-MRI
folder (``benchmarks/mri_folder.py``), both written under ``--out`` from data that ships with scikit-learn and
matplotlib. A finished run (its ``metrics.json`` present) is kept, so an interrupted benchmark continues where it
stopped. Each run's wall-clock and CPU seconds go to ``timing.json`` in its folder.

The table gives, per target and start, the test accuracy (mean over seeds, and each seed) of every fixed rate, of
the fixed default (``classifiers.finetune.DEFAULT_LR``), of the best fixed rate (chosen on the test means: an
oracle no run can use) and of ``auto`` with the rate it chose per seed; then what ``auto`` cost: its search's
seconds and steps, and its runs' wall-clock and CPU time against the fixed default's.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers.finetune import AUTO, AUTO_CANDIDATES, DEFAULT_LR  # noqa: E402

SYNTHRAD = "n_train=1200&n_val=300&n_test=600"
TARGETS = {
    "synthrad-unseen": f"synthrad:unseen?{SYNTHRAD}",
    "synthrad-shifted": f"synthrad:shifted?{SYNTHRAD}",
    "digits": "imagefolder:{out}/digits",
    "mri": "imagefolder:{out}/mri",
}
BUILDERS = {"digits": "digits_folder.py", "mri": "mri_folder.py"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heated", required=True, help="the heated.pt of the heated start (grayscale, --image-size)")
    p.add_argument("--out", default="runs/lr-auto", help="folder of the image folders and the runs")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--starts", nargs="+", default=["scratch", "heated"], choices=["scratch", "heated"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rates", nargs="+", default=[*map(str, AUTO_CANDIDATES), AUTO],
                   help=f"fixed rates and/or {AUTO}")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--table-only", action="store_true", help="print the table of the runs already done")
    return p.parse_args(argv)


def command(a: argparse.Namespace, target: str, start: str, seed: int, rate: str, run_dir: Path) -> list[str]:
    init = ["--init", "scratch", "--classifier", "smallcnn", "--channels", "1"] if start == "scratch" else \
        ["--init", a.heated]
    return [sys.executable, str(ROOT / "scripts" / "finetune.py"), *init, "--image-size", str(a.image_size),
            "--dataset", TARGETS[target].format(out=a.out), "--epochs", str(a.epochs), "--seed", str(seed),
            "--lr", rate, "--device", "cpu", "--precision", "fp32", "--workers", "0", "--run-dir", str(run_dir)]


def run(cmd: list[str], run_dir: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (run_dir / "timing.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))


def folder(a: argparse.Namespace, target: str, start: str, seed: int, rate: str) -> Path:
    return Path(a.out) / "r" / f"{target}__{start}__{rate}__s{seed}"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def table(a: argparse.Namespace) -> None:
    fixed = [r for r in a.rates if r != AUTO]
    print(f"machine: {cpu_name()}, fp32, smallcnn {a.image_size} px, {a.epochs} "
          f"epochs, seeds {' '.join(map(str, a.seeds))}; test accuracy, mean (per seed)\n")
    print("| target | start | " + " | ".join(f"lr {r}" for r in fixed) + " | fixed default | best fixed | auto "
          "(chosen per seed) | auto - default | auto - best |")
    print("|" + "-|" * (len(fixed) + 7))
    costs, diffs, same = [], [], []
    for target in a.targets:
        for start in a.starts:
            acc, chosen = {}, []
            for rate in a.rates:
                vals = []
                for seed in a.seeds:
                    d = folder(a, target, start, seed, rate)
                    if not (d / "metrics.json").is_file():
                        break
                    vals.append(json.loads((d / "metrics.json").read_text())["accuracy"])
                    if rate == AUTO:
                        search = json.loads((d / "config.json").read_text())["lr_search"]
                        chosen.append(search["chosen"])
                        twin = folder(a, target, start, seed, str(search["chosen"])) / "metrics.json"
                        if twin.is_file():
                            same.append(json.loads(twin.read_text()) == json.loads((d / "metrics.json").read_text()))
                        base = folder(a, target, start, seed, str(DEFAULT_LR[start if start == "scratch"
                                                                             else "heated"]))
                        if (d / "timing.json").is_file() and (base / "timing.json").is_file():
                            costs.append((search, json.loads((d / "timing.json").read_text()),
                                          json.loads((base / "timing.json").read_text())))
                else:
                    acc[rate] = vals
            cells = {r: f"{mean(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})" for r, v in acc.items()}
            means = {r: mean(v) for r, v in acc.items() if r != AUTO}
            default = str(DEFAULT_LR["scratch" if start == "scratch" else "heated"])
            best = max(means, key=means.get) if means else None
            row = [target, start, *(cells.get(r, "") for r in fixed),
                   f"{means[default]:.3f}" if default in means else "",
                   f"{means[best]:.3f} (lr {best})" if best else "",
                   f"{mean(acc[AUTO]):.3f} ({', '.join(f'{c:g}' for c in chosen)})" if AUTO in acc else "",
                   f"{mean(acc[AUTO]) - means[default]:+.3f}" if AUTO in acc and default in means else "",
                   f"{mean(acc[AUTO]) - means[best]:+.3f}" if AUTO in acc and best else ""]
            print("| " + " | ".join(row) + " |")
            if AUTO in acc and default in means:
                diffs.append((mean(acc[AUTO]) - means[default], mean(acc[AUTO]) - means[best], means[best]
                              - means[default]))
    if diffs:
        auto_default, auto_best, best_default = (mean(list(d)) for d in zip(*diffs))
        print(f"\nmean over the {len(diffs)} rows: auto - fixed default {auto_default:+.4f}, auto - best fixed "
              f"{auto_best:+.4f}, best fixed - fixed default {best_default:+.4f}")
    if same:
        print(f"\n{sum(same)} of {len(same)} auto runs end with the metrics.json of the fixed-rate run at the rate "
              "they chose (the search leaves no trace)")
    if costs:
        search_s = [s["seconds"] for s, _, _ in costs]
        share = [len(s["candidates"]) * s["steps_per_candidate"] / s["run_steps"] for s, _, _ in costs]
        wall = [t["wall_s"] / b["wall_s"] for _, t, b in costs]
        cpu = [t["cpu_s"] / b["cpu_s"] for _, t, b in costs]
        print(f"\nauto's cost over {len(costs)} runs: search {min(search_s):.1f}-{max(search_s):.1f} s (mean "
              f"{mean(search_s):.1f}); search steps / training steps {min(share):.2f}-{max(share):.2f}; whole run "
              f"against the fixed default's: wall-clock x{mean(wall):.2f} (x{min(wall):.2f}-x{max(wall):.2f}), CPU "
              f"time x{mean(cpu):.2f} (x{min(cpu):.2f}-x{max(cpu):.2f})")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not a.table_only:
        for target, script in BUILDERS.items():
            if target in a.targets and not (Path(a.out) / target).is_dir():
                subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), str(Path(a.out) / target)],
                               check=True, stdout=subprocess.DEVNULL)
        for target in a.targets:
            for start in a.starts:
                for seed in a.seeds:
                    for rate in a.rates:
                        d = folder(a, target, start, seed, rate)
                        if (d / "metrics.json").is_file():
                            continue
                        shutil.rmtree(d, ignore_errors=True)  # a run cut short: started again
                        cmd = command(a, target, start, seed, rate, d)
                        print(" ".join(cmd), flush=True)
                        run(cmd, d)
    table(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
