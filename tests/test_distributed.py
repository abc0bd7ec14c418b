"""torchrun with gloo on CPU: identical weights on every rank, rank 0 alone writes, N x B behaves like 1 x N*B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=0",
           "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", str(WORKER), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


def train_on_two_ranks(mode: str, tmp_path: Path) -> tuple[dict, dict, Path, set[str]]:
    """Run ``dist_worker.py mode`` on 2 ranks; return each rank's weights, the run folder and its file names,
    having checked that one process alone (rank 0) wrote TensorBoard events."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    torchrun(2, mode, str(out), str(run_dir))
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    names = {p.name for p in run_dir.iterdir()}
    assert len([n for n in names if n.startswith("events.out.tfevents")]) == 1, names
    return r0, r1, run_dir, names


def test_two_ranks_pretrain_identically_and_only_rank0_writes(tmp_path: Path) -> None:
    r0, r1, run_dir, names = train_on_two_ranks("pretrain", tmp_path)
    assert_same_state(r0["classifier"], r1["classifier"])
    assert_same_state(r0["policy"], r1["policy"])
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "heated.pt"} <= names
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]
    assert len(steps) == 4  # steps 2, 4, 6 and the checkpoint at 3, once (not once per rank)


def test_two_ranks_finetune_identically_and_only_rank0_writes(tmp_path: Path) -> None:
    r0, r1, run_dir, names = train_on_two_ranks("finetune", tmp_path)
    assert_same_state(r0["model"], r1["model"])
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "metrics.json"} <= names
    saved = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert_same_state(saved, r0["model"])


@pytest.mark.parametrize("global_batch", [8])
def test_two_processes_of_batch_b_update_like_one_of_batch_2b(tmp_path: Path, global_batch: int) -> None:
    torchrun(2, "equivalence", str(tmp_path), str(global_batch))
    torchrun(1, "equivalence", str(tmp_path), str(global_batch))
    two = [torch.load(tmp_path / f"eq2-rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = torch.load(tmp_path / "eq1-rank0.pt", weights_only=True)
    assert_same_state(two[0]["policy"], two[1]["policy"])
    assert_same_state(two[0]["policy"], one["policy"], atol=1e-5)
    assert torch.allclose(two[0]["baseline"], one["baseline"], atol=1e-6)


def test_ranks_draw_different_random_numbers_and_each_resumes_its_own(tmp_path: Path) -> None:
    """Every rank samples its own mask noise (not rank 0's numbers on every rank), and a checkpoint holds every
    rank's random state, so each rank resumes its own stream exactly."""
    out = tmp_path / "out"
    out.mkdir()
    torchrun(2, "random_streams", str(out), str(tmp_path / "run"))
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["first"], r1["first"])
    for r in (r0, r1):
        assert torch.equal(r["resumed"], r["after_checkpoint"])
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["rng"]
    assert isinstance(saved, list) and len(saved) == 2


def test_ranks_resuming_a_one_process_checkpoint_still_draw_different_numbers(tmp_path: Path) -> None:
    """A checkpoint with one random state, resumed by two processes: each rank is reseeded from (seed, step, rank)
    rather than both continuing the one saved stream."""
    from dist_worker import streams_config

    from agents.runner import PretrainRunner

    PretrainRunner(streams_config(str(tmp_path / "run"))).save_checkpoint()
    out = tmp_path / "out"
    out.mkdir()
    torchrun(2, "resumed_draws", str(out), str(tmp_path / "run"))
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["resumed"], r1["resumed"])
