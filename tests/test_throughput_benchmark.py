"""benchmarks/throughput.py's real runs driven in blocks (``--runs N --interleave``): each run's logged windows time
its own steps only, and each block runs exactly its steps."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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
    """Between blocks the other runs step: a thousand seconds here, which the run's window clocks must leave out; each
    step takes a second more than it does, which they must keep. A block counts the windows that closed in it, whole
    (one that began in the previous block too, its pause left out), also the epoch's last, short one; with
    ``untimed``, those that close in its first steps are left out."""
    from agents.reinforce import Reinforce
    from classifiers import runlog

    real, shift = time.perf_counter, [0.0]
    monkeypatch.setattr(runlog, "time", SimpleNamespace(perf_counter=lambda: real() + shift[0]))
    monkeypatch.setattr(Reinforce, "overlap", True)  # the update thread too, whatever the machine's cores
    env = EnvConfig(dataset=synthrad_spec, classifier="smallcnn", image_size=32, grid=8, blur_kernel=5, blur_sigma=2,
                    batch_size=16, device="cpu")  # 15 steps an epoch
    runner = PretrainRunner(PretrainConfig(algo="reinforce", env=env, epochs=5, max_steps=40, log_every=4,
                                           run_dir=str(tmp_path / "run")))
    step = runner.core.step

    def second_longer(*args, **kwargs):
        shift[0] += 1.0
        return step(*args, **kwargs)

    runner.core.step = second_longer
    blocks = throughput.RunBlocks(runner)
    got = []
    for steps in (10, 5, 10):  # the second ends the epoch; the third starts the next
        shift[0] += 1000.0
        got.append(blocks.advance(steps))
        assert runner.core.global_step == sum((10, 5, 10)[: len(got)])
    windows = dict(throughput.logged_windows(runner.run_dir / "metrics.jsonl"))
    assert sorted(windows) == [4, 8, 12, 15, 16, 20, 24]
    covered = [8, 15 - 8, 24 - 15]  # the steps of the windows that closed in each block
    assert [images for images, _ in got] == [n * 16 for n in covered]
    for (_, seconds), n in zip(got, covered):
        assert n <= seconds < n + 100
    assert got[1][1] == pytest.approx(4 * 16 / windows[12] + 3 * 16 / windows[15])
    images, seconds = blocks.advance(12, untimed=4)  # steps 26-37: the window at 28 is left out; 30 (epoch end), 32, 36
    assert images == 8 * 16 and 8 <= seconds < 108
    windows = dict(throughput.logged_windows(runner.run_dir / "metrics.jsonl"))
    assert seconds == pytest.approx(2 * 16 / windows[30] + 2 * 16 / windows[32] + 4 * 16 / windows[36])
    assert not runner.done()
    runner.logger.close()
