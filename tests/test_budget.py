"""The budgeted objective: each mask held at a budget, the policy rewarded for what it hides from a live classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pretrain
import pytest

from agents.registry import BUDGETED_ENV, environment_for, make_agent
from envs.core import EnvConfig


def test_budget_algos_set_their_environment_unless_the_user_did() -> None:
    env = environment_for("reinforce-budget", EnvConfig())
    assert (env.reward, env.mask_budget) == ("adversarial", 0.5)
    assert BUDGETED_ENV == {"reward": "adversarial", "mask_budget": 0.5}
    assert environment_for("reinforce-budget", EnvConfig(mask_budget=0.3)).mask_budget == 0.3
    assert environment_for("reinforce", EnvConfig()) == EnvConfig()
    assert make_agent("reinforce-budget", {}).cfg.param == "softplus"
    assert make_agent("reinforce-budget", {"param": "exp"}).cfg.param == "exp"
    with pytest.raises(ValueError, match="mask budget 1.0"):
        EnvConfig(mask_budget=1.0).validate()


def test_the_environment_applies_the_budget_and_says_so(tmp_path: Path) -> None:
    """A budgeted run records its settings, applies every grid at the budget (logged mask/mean), and its config.json
    shows the agent defaults the name chose."""
    run = tmp_path / "run"
    argv = ["--algo", "reinforce-budget", "--dataset", "synthrad?n_train=96&n_val=24&n_test=24", "--image-size", "32",
            "--grid", "8", "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "16", "--max-steps", "4",
            "--device", "cpu", "--log-every", "2", "--mask-budget", "0.3", "--run-dir", str(run)]
    assert pretrain.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["env"]["reward"] == "adversarial" and config["env"]["mask_budget"] == 0.3
    assert config["agent"]["param"] == "softplus"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "mask/mean" in line]
    assert all(r["mask/mean"] == pytest.approx(0.3, abs=1e-5) for r in rows)
