"""Images per second of pretraining under torchrun with 1 and 2 processes (gloo on CPU, NCCL on CUDA).

    python benchmarks/distributed.py                      # smallcnn, 64 px, batch 32 per process, reinforce
    python benchmarks/distributed.py --nprocs 1 2 4 --device cuda --classifier resnet50 --image-size 224

Each configuration is a real ``scripts/pretrain.py`` run; the figure is the median of the run's logged
``perf/images_per_second`` after the first logging window (start-up excluded). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers.train import PRECISIONS  # noqa: E402


def measure(nproc: int, a: argparse.Namespace, out: Path) -> tuple[float, str]:
    """Images per second of one run over all its processes, and the precision its classifier resolved to."""
    run_dir = out / f"n{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", str(ROOT / "scripts" / "pretrain.py"), "--algo", a.algo,
           "--classifier", a.classifier, "--image-size", str(a.image_size), "--grid", str(a.grid),
           "--batch-size", str(a.batch_size), "--max-steps", str(a.steps), "--log-every", "10",
           "--ckpt-every", str(a.steps), "--image-every", str(10 * a.steps), "--device", a.device,
           "--precision", a.precision, "--dataset", a.dataset, "--run-dir", str(run_dir)]
    threads = max(1, (os.cpu_count() or 1) // nproc) if a.device == "cpu" else 1
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["perf/images_per_second"] for r in rows if "perf/images_per_second" in r][1:]
    return statistics.median(speeds), json.loads((run_dir / "config.json").read_text())["env"]["precision"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--algo", default="reinforce")
    p.add_argument("--classifier", default="smallcnn")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="the classifier's arithmetic")
    p.add_argument("--dataset", default="synthrad?n_train=4000&n_val=64&n_test=64")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measured = {n: measure(n, a, Path(tmp)) for n in a.nprocs}
    results = {n: ips for n, (ips, _) in measured.items()}
    base = results[a.nprocs[0]]
    print(f"{a.algo}, {a.classifier}, {a.image_size} px, batch {a.batch_size} per process, {a.device}, "
          f"classifier in {measured[a.nprocs[0]][1]}\n")
    print("| processes | images/s (all processes) | vs first |\n|-|-|-|")
    for n, v in results.items():
        print(f"| {n} | {v:.1f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
