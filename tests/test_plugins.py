"""Agents from other packages: the ``noisemask.agents`` entry points, and the worked example of docs/agents.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from envs.core import StepResult

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def plugin_site(tmp_path: Path) -> Path:
    """A folder that Python's ``importlib.metadata`` reads as an installed distribution declaring two agent plugins:
    the worked example, and one whose module does not exist."""
    info = tmp_path / "site" / "cem_plugin-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cem-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[noisemask.agents]\ncem-mask = cem_agent:register_agents\n"
                                           "broken = no_such_module:register\n")
    return info.parent


def pretrain(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site(tmp_path)), str(EXAMPLES), str(ROOT)]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--dataset", "synthrad?n_train=64&n_val=24&n_test=24",
           "--image-size", "16", "--grid", "4", "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "8",
           "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_an_installed_plugin_is_an_algo_and_a_broken_one_is_named_in_one_line(tmp_path: Path) -> None:
    """``--algo cem-mask`` runs the example through its entry point, with its option given by ``--agent-option``; the
    broken plugin is named in one line on stderr and the run goes on; asking for it says why it is missing; an option
    the agent does not take is refused, naming the ones it takes."""
    run_dir = tmp_path / "run"
    done = pretrain(tmp_path, "--algo", "cem-mask", "--agent-option", "elite=0.5", "--max-steps", "4",
                    "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    complaints = [line for line in done.stderr.splitlines() if "plugin" in line]
    assert len(complaints) == 1 and "'broken' (no_such_module:register) failed to load" in complaints[0]
    assert "ModuleNotFoundError" in complaints[0] and "the other agents still work" in complaints[0]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == "cem-mask" and config["agent"] == {"elite": 0.5}
    assert (run_dir / "heated.pt").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("policy/elite_reward" in r for r in rows) and any("diagnostics/kl_uniform" in r for r in rows)

    missing = pretrain(tmp_path, "--algo", "broken", "--max-steps", "2", "--run-dir", str(tmp_path / "b"))
    assert missing.returncode == 2 and "unknown algo 'broken' (its plugin failed to load: ModuleNotFoundError" \
        in missing.stderr.splitlines()[-1]
    foreign = pretrain(tmp_path, "--algo", "cem-mask", "--agent-option", "temperature=2", "--max-steps", "2",
                       "--run-dir", str(tmp_path / "c"))
    assert foreign.returncode == 2
    assert foreign.stderr.splitlines()[-1] == ("error: --agent-option temperature: the agent 'cem-mask' takes no "
                                               "option 'temperature'; it takes elite, rate, concentration")


@pytest.fixture()
def cem(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import cem_agent

    return cem_agent


def fake_core(grid: int) -> SimpleNamespace:
    return SimpleNamespace(cfg=SimpleNamespace(grid=grid), dev=SimpleNamespace(device=torch.device("cpu")))


@pytest.mark.parametrize("learning", ["on", "off"])
def test_the_example_learns_what_the_reward_asks_and_not_with_its_update_off(cem, learning: str) -> None:
    """Rewarded by each grid's mean over the top half of the cells, 200 steps of the example move its top-half means
    above 0.8 and its bottom-half ones stay near 0.5; with its step size near 0 nothing moves."""
    torch.manual_seed(0)
    agent = cem.CrossEntropyMask(rate=0.1 if learning == "on" else 1e-9)
    agent.bind(fake_core(4), 200)
    images = torch.zeros(32, 1, 16, 16, dtype=torch.uint8)
    for _ in range(200):
        grid = agent.act(images).grid
        reward = grid[:, :2].mean((1, 2))
        agent.observe(StepResult(reward=reward, loss=-reward, correct=reward, truncated=False, grid=grid))
    top, bottom = float(agent.mean[:2].mean()), float(agent.mean[2:].mean())
    if learning == "on":
        assert top > 0.8 and abs(bottom - 0.5) < 0.15, (top, bottom)
    else:
        assert abs(top - 0.5) < 1e-3 and abs(bottom - 0.5) < 1e-3


def test_the_example_keeps_its_state_and_refuses_bad_options(cem) -> None:
    agent = cem.CrossEntropyMask()
    agent.bind(fake_core(4), 10)
    agent.mean[0, 0] = 0.9
    other = cem.CrossEntropyMask()
    other.bind(fake_core(4), 10)
    other.load_state_dict(agent.state_dict())
    images = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    assert torch.equal(other.mask_distribution(images).mean, agent.mask_distribution(images).mean)
    with pytest.raises(ValueError, match="cem-mask needs 0 < elite <= 1"):
        cem.CrossEntropyMask(elite=0.0)
