"""A real TensorBoard server on two tiny runs: its HParams and custom scalars plugins serve what the runs wrote."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pretrain
import pytest
from test_pretrain import tiny_args

from agents.overview import OVERVIEW, SHOWN_SETTINGS

STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


@pytest.fixture(scope="module")
def logdir(synthrad_spec: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``reinforce`` and a ``none`` run of 4 steps in one folder, as a study leaves them."""
    root = tmp_path_factory.mktemp("board")
    for algo in ("reinforce", "none"):
        assert pretrain.main([*tiny_args(synthrad_spec, root / algo, algo), "--eval-every", "2"]) == 0
    return root


@pytest.fixture(scope="module")
def board(logdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``tensorboard --logdir`` on a port the system picks; its address."""
    said = tmp_path_factory.mktemp("board-log") / "stderr"
    with open(said, "w") as err:
        server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", "0",
                                   "--host", "127.0.0.1", "--load_fast", "false", "--reload_interval", "1"],
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        # it says "TensorBoard 2.x at http://127.0.0.1:PORT/ (Press CTRL+C to quit)" once it serves
        while not (found := re.search(r"http://127\.0\.0\.1:\d+", said.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, f"no TensorBoard: {said.read_text()}"
            time.sleep(0.2)
        yield found.group(0)
    finally:
        server.terminate()
        server.wait(timeout=30)


def post(board: str, route: str, body: dict) -> dict:
    request = urllib.request.Request(f"{board}/data/plugin/{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def get(board: str, route: str, **query: str) -> dict:
    url = f"{board}/data/plugin/{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def session_groups(board: str) -> list[dict]:
    """The HParams dashboard's rows, once the server has read both runs (it reads the folder in the background)."""
    deadline = time.monotonic() + 60
    while True:
        groups = post(board, "hparams/session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 10,
                                                        "allowedStatuses": STATUSES})["sessionGroups"]
        done = len(groups) == 2 and all(s["metricValues"] for g in groups for s in g["sessions"])
        if done or time.monotonic() > deadline:
            return groups
        time.sleep(0.5)


def test_the_hparams_dashboard_has_a_row_per_run_with_every_setting_and_the_key_figures(board: str) -> None:
    rows = {g["name"]: g for g in session_groups(board)}
    assert set(rows) == {"reinforce", "none"}
    reinforce = rows["reinforce"]["hparams"]
    assert reinforce["algo"] == "reinforce" and reinforce["env.grid"] == 8 and reinforce["eval_every"] == 2
    assert reinforce["agent.baseline_momentum"] == 0.9 and reinforce["agent.param"] == "exp"  # defaults, resolved
    assert reinforce["env.mask_budget"] == "None"
    session = rows["reinforce"]["sessions"][0]
    assert session["status"] == "STATUS_SUCCESS"
    figures = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
    assert {"heated/test/accuracy", "heated/test_perturbed/accuracy", "heated/test/shortcut_gap",
            "diagnostics/kl_uniform", "diagnostics/content_gap"} <= set(figures)
    assert 0.0 <= figures["heated/test/accuracy"] <= 1.0
    none = {m["name"]["tag"] for m in rows["none"]["sessions"][0]["metricValues"]}
    assert "heated/test/accuracy" in none and "diagnostics/kl_uniform" not in none  # no policy, no KL

    experiment = post(board, "hparams/experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"env.grid", "agent.policy_lr", "agent.n_steps", "agent.noise_std"} <= columns  # every agent's options
    first = [h["name"] for h in experiment["hparamInfos"] if h["differs"]]  # the dashboard shows these five first
    assert first == sorted(SHOWN_SETTINGS)
    shown = {m["name"]["tag"]: m["displayName"] for m in experiment["metricInfos"]}
    assert shown["heated/test_perturbed/accuracy"] == "heated accuracy (test, perturbed)"


def test_the_custom_scalars_overview_draws_train_and_validation_clean_and_perturbed(board: str) -> None:
    session_groups(board)  # both runs read
    layout = get(board, "custom_scalars/layout")
    [category] = layout["category"]  # the runs' identical layouts merged
    assert category["title"] == "overview"
    charts = {c["title"]: c["multiline"]["tag"] for c in category["chart"]}
    assert charts == OVERVIEW["overview"]
    accuracy = next(tags for title, tags in charts.items() if title.startswith("accuracy"))
    served = get(board, "custom_scalars/scalars", run="reinforce", tag="|".join(accuracy))
    assert served["regex_valid"]
    lines = {tag: [step for _, step, _ in events] for tag, events in served["tag_to_events"].items()}
    assert lines == {"train/accuracy": [2, 4], "val/accuracy": [2, 4], "val_perturbed/accuracy": [2, 4]}
