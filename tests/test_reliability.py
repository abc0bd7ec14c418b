"""A pretraining process killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthrad?n_train=192&n_val=24&n_test=24", "--image-size", "32", "--grid", "8",
        "--batch-size", "8", "--classifier", "smallcnn", "--device", "cpu", "--log-every", "3", "--ckpt-every", "4",
        "--image-every", "10", "--epochs", "2"]


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / name), *args]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_after_checkpoint(cmd: list[str], checkpoint: Path, min_step: int) -> None:
    """Start ``cmd``, wait until ``checkpoint`` exists and the run passed ``min_step``, then SIGKILL it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = checkpoint.with_name("metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and metrics.exists():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= min_step:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def comparable_metrics(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("algo, precision", [("reinforce", "bf16"), ("reinforce", "fp32"), ("uniform-mask", "auto"),
                                             ("ppo", "auto"), ("reinforce-lff-blend", "fp32")])
def test_pretrain_killed_and_resumed_equals_uninterrupted(tmp_path: Path, algo: str, precision: str) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["--algo", algo, "--precision", precision, *TINY]
    run(script("pretrain.py", *args, "--run-dir", str(whole)))
    kill_after_checkpoint(script("pretrain.py", *args, "--run-dir", str(broken)), broken / "checkpoint.pt",
                          min_step=13)
    assert not (broken / "heated.pt").exists()
    run(script("pretrain.py", *args, "--run-dir", str(broken), "--resume"))

    a = torch.load(whole / "heated.pt", weights_only=True)
    b = torch.load(broken / "heated.pt", weights_only=True)
    assert_equal_states(a["state_dict"], b["state_dict"])
    ca = torch.load(whole / "checkpoint.pt", weights_only=True)
    cb = torch.load(broken / "checkpoint.pt", weights_only=True)
    assert_equal_states(ca["core"]["classifier"], cb["core"]["classifier"])
    if algo != "uniform-mask":
        assert_equal_states(ca["agent"]["policy"], cb["agent"]["policy"])
    if algo == "reinforce-lff-blend":  # the biased classifier, and the blend's styles drawn from the global generator
        assert_equal_states(ca["core"]["biased"], cb["core"]["biased"])
    assert comparable_metrics(whole / "metrics.jsonl") == comparable_metrics(broken / "metrics.jsonl")


def test_damaged_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["--algo", "reinforce", "--run-dir", str(run_dir), *TINY]
    run(script("pretrain.py", *args, "--max-steps", "8"))
    (run_dir / "checkpoint.pt").write_bytes(b"\x00garbage")
    proc = subprocess.run(script("pretrain.py", *args, "--max-steps", "12", "--resume"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint.pt" in proc.stderr and "previous checkpoint" in proc.stderr
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["core"]["global_step"] == 12


def _nan_after(calls: int, fn, counts=lambda: True):
    """Wrap ``fn`` so that from its ``calls``-th call on its output is NaN; only calls while ``counts()`` is true are
    counted (and poisoned)."""
    count = [0]

    def wrapped(*args, **kwargs):
        counted = counts()
        count[0] += counted
        out = fn(*args, **kwargs)
        return out * float("nan") if counted and count[0] >= calls else out

    return wrapped


@pytest.mark.parametrize("where", ["concentration", "reward", "loss"])
def test_non_finite_value_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, where):
    from agents.policy import BetaMaskPolicy
    from agents.runner import PretrainConfig, PretrainRunner
    from classifiers.train import NonFiniteError
    from envs.core import EnvConfig, PretrainCore

    if where == "concentration":
        # the policy's training passes only: the runner's diagnostics read it without gradient as well
        monkeypatch.setattr(BetaMaskPolicy, "head_output", _nan_after(6, BetaMaskPolicy.head_output,
                                                                      counts=torch.is_grad_enabled))
    elif where == "loss":
        import envs.core

        poison = _nan_after(6, lambda x: x)
        original_step = envs.core.supervised_step
        monkeypatch.setattr(envs.core, "supervised_step",
                            lambda model, opt, inputs, *a, **k: original_step(model, opt, poison(inputs), *a, **k))
    else:  # where the environment computes it: an agent may read it before the step returns (Action.on_reward)
        original = PretrainCore._reward

        def reward(self, *args):
            out = original(self, *args)
            return out * float("nan") if self.global_step >= 5 else out  # from the 6th step on

        monkeypatch.setattr(PretrainCore, "_reward", reward)
    env = EnvConfig(dataset="synthrad?n_train=192&n_val=24&n_test=24", batch_size=8, image_size=32, grid=8,
                    device="cpu")
    cfg = PretrainConfig(algo="reinforce", env=env, max_steps=20, run_dir=str(tmp_path / "run"), ckpt_every=4)
    runner = PretrainRunner(cfg)
    names = {"concentration": "policy concentration alpha", "reward": "reward", "loss": "classifier loss"}
    with pytest.raises(NonFiniteError, match=names[where]) as exc:
        runner.run()
    assert "at step" in str(exc.value)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for tensor in state["core"]["classifier"].values():
        assert torch.isfinite(tensor.float()).all()
    assert state["core"]["global_step"] == 4


def test_finetune_killed_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    heated = tmp_path / "pre"
    run(script("pretrain.py", "--algo", "none", "--run-dir", str(heated), *TINY, "--max-steps", "4"))
    args = ["--init", str(heated / "heated.pt"), "--dataset", "synthrad:unseen?n_train=240&n_val=24&n_test=24",
            "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--log-every", "2", "--ckpt-every", "4",
            "--device", "cpu"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run(script("finetune.py", *args, "--run-dir", str(whole)))
    kill_after_checkpoint(script("finetune.py", *args, "--run-dir", str(broken)), broken / "checkpoint.pt",
                          min_step=21)
    assert not (broken / "metrics.json").exists()
    run(script("finetune.py", *args, "--run-dir", str(broken), "--resume"))

    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(broken / "model.pt", weights_only=True)
    assert_equal_states(a["state_dict"], b["state_dict"])
    assert comparable_metrics(whole / "metrics.jsonl") == comparable_metrics(broken / "metrics.jsonl")
    assert json.loads((whole / "metrics.json").read_text()) == json.loads((broken / "metrics.json").read_text())


def test_random_states_restore_from_the_list_and_from_an_older_single_state(tmp_path: Path) -> None:
    """Checkpoints hold a list of per-rank random states (one in one process); a checkpoint written before that,
    holding one state, still resumes the same stream."""
    import numpy as np

    from classifiers.checkpoint import rng_state, run_rng_state, set_run_rng_state
    from classifiers.io import load_tensors, save_tensors

    torch.manual_seed(3)
    np.random.seed(3)
    save_tensors({"list": run_rng_state(), "single": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(2))
    saved = load_tensors(tmp_path / "rng.pt")
    assert isinstance(saved["list"], list) and len(saved["list"]) == 1
    for key in ("list", "single"):
        torch.manual_seed(99)
        set_run_rng_state(saved[key], seed=0, step=0)
        assert torch.equal(torch.rand(4), expected[0]) and np.array_equal(np.random.rand(2), expected[1]), key


@pytest.mark.parametrize(("poison", "where", "saved_step"), [
    ("features in the update", "updating from the rollout that ended at step 16", 8),
    ("weights after the update", "updating from the rollout that ended at step 16", 8),
    ("features when acting", "acting at step 16", 16),
])
def test_non_finite_ppo_policy_stops_the_run_naming_the_step(tmp_path, monkeypatch, poison, where, saved_step):
    """NaN reaches stable-baselines3's PPO (rollouts of 8 steps) during, after or between its updates: the run
    stops naming the step, and the last checkpoint (taken at a rollout boundary) holds only finite weights."""
    from stable_baselines3 import PPO

    from agents.runner import PretrainConfig, PretrainRunner
    from agents.sb3 import MaskFeaturesExtractor
    from classifiers.train import NonFiniteError
    from envs.core import EnvConfig

    nan_features, updates = [False], [0]
    train, features = PPO.train, MaskFeaturesExtractor.forward

    def poisoned_train(self):
        updates[0] += 1
        second = updates[0] == 2  # the update after the second rollout, at step 16
        nan_features[0] |= second and poison == "features in the update"
        train(self)
        if second and poison == "weights after the update":  # what an overflowing probability ratio leaves
            with torch.no_grad():
                next(self.policy.parameters()).fill_(float("nan"))
        nan_features[0] |= second and poison == "features when acting"

    monkeypatch.setattr(PPO, "train", poisoned_train)
    monkeypatch.setattr(MaskFeaturesExtractor, "forward",
                        lambda self, obs: features(self, obs) * (float("nan") if nan_features[0] else 1.0))
    env = EnvConfig(dataset="synthrad?n_train=192&n_val=24&n_test=24", batch_size=8, image_size=32, grid=8,
                    device="cpu")
    cfg = PretrainConfig(algo="ppo", env=env, max_steps=40, run_dir=str(tmp_path / "run"), ckpt_every=4)
    with pytest.raises(NonFiniteError, match=r"not finite .*while " + where):
        PretrainRunner(cfg).run()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["core"]["global_step"] == saved_step
    for part in (state["core"]["classifier"], state["agent"]["policy"]):
        for tensor in part.values():
            assert torch.isfinite(tensor.float()).all()
