"""benchmarks/throughput.py's real runs driven in blocks (``--runs N --interleave``): each run's logged windows time
its own steps only, and each block runs exactly its steps."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from agents.runner import PretrainConfig, PretrainRunner
from envs.core import EnvConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_run_driven_in_blocks_logs_windows_that_time_its_own_steps_only(throughput, synthrad_spec: str,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Between blocks the other runs step: a thousand seconds here, which the run's window clock must leave out.
    A block counts the images of the windows that closed in it, whole (one that began in the previous block too)."""
    from classifiers import runlog

    real, others = time.perf_counter, [0.0]
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: real() + others[0])
    env = EnvConfig(dataset=synthrad_spec, classifier="smallcnn", image_size=32, grid=8, blur_kernel=5, blur_sigma=2,
                    batch_size=16, device="cpu")
    runner = PretrainRunner(PretrainConfig(algo="reinforce", env=env, epochs=5, max_steps=30, log_every=5,
                                           run_dir=str(tmp_path / "run")))
    blocks = throughput.RunBlocks(runner)
    got = []
    for steps in (10, 7, 8):
        others[0] += 1000.0
        got.append(blocks.advance(steps))
        assert runner.core.global_step == sum(s for s in (10, 7, 8)[: len(got)])
    assert [images for images, _ in got] == [10 * 16, 5 * 16, 10 * 16]  # windows at 5, 10 | 15 | 20, 25
    assert all(0 < seconds < 1000 for _, seconds in got)
    rows = [json.loads(line) for line in (runner.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = {r["step"]: r["perf/images_per_second"] for r in rows if "perf/images_per_second" in r}
    assert sorted(windows) == [5, 10, 15, 20, 25]
    assert got[2][1] == pytest.approx(5 * 16 / windows[20] + 5 * 16 / windows[25])
    assert not runner.done()
    runner.logger.close()
