"""The comparison study: results files with the expected rows, reuse of finished runs, resumption, statistics."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import compare
import numpy as np
import pytest

from agents.study import (
    Study,
    StudyConfig,
    discoveries,
    paired_difference,
    paired_p_value,
    parse_target,
    summary_markdown,
)
from classifiers.finetune import DEFAULT_LR, SCRATCH, Finetuner
from classifiers.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = "synthrad?n_train=96&n_val=24&n_test=24"
"""12 classes x 8 training images."""
UNSEEN = "synthrad:unseen?n_train=48&n_val=24&n_test=24"
"""6 classes x 8 training images."""
TINY = ["--image-size", "16", "--grid", "4", "--blur-kernel", "3", "--blur-sigma", "1", "--batch-size", "8",
        "--pretrain-steps", "3", "--finetune-epochs", "1", "--fewshot-epochs", "2", "--device", "cpu"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_study_at_a_tiny_size_writes_all_three_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    argv = ["--quick", "--methods", "none", "reinforce", "scratch", "--seeds", "0", "1", "--pretrain-dataset",
            PRETRAIN, "--targets", PRETRAIN, f"{UNSEEN}@4", "--out", str(out), *TINY]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "# Comparison study" in printed and f"tensorboard --logdir {out}" in printed

    rows = read_csv(out / "results.csv")
    assert len(rows) == 3 * 2 * 2
    assert {(r["method"], r["seed"], r["target"]) for r in rows} == {
        (m, s, t) for m in ("none", "reinforce", "scratch") for s in ("0", "1") for t in (PRETRAIN, f"{UNSEEN}@4")}
    for r in rows:
        assert all(0.0 <= float(r[k]) <= 1.0 for k in METRIC_NAMES)
        assert Path(r["finetune_dir"], "metrics.json").is_file()
        assert (r["pretrain_dir"] == "") == (r["method"] == "scratch")
        few = r["target"].endswith("@4")
        assert int(r["train_images"]) == (6 * 4 if few else 96)
        assert r["head"] == {"scratch": "new"}.get(r["method"], "replaced" if few else "kept")

    md = (out / "results.md").read_text()
    # two targets, then the heated models on clean and on perturbed inputs; the policy's diagnostics
    assert md.count("Paired difference to `none`") == 4 and "n = 2" in md
    assert "# The heated models, before fine-tuning" in md and "# What the policy learned" in md
    summary = md[md.index("## Summary"):md.index("Cells: ")]  # one table before the per-target ones
    assert ("| method | heated: gap | heated: worst group | heated: shifted acc. | heated: shifted acc., perturbed |"
            in summary)
    assert summary.count("| reinforce | ") == 1 and summary.count("(+") + summary.count("(-") >= 5
    assert "## Over the run" in md and "Settings of each learned method" in md
    heated = read_csv(out / "heated.csv")
    assert {(r["method"], r["seed"]) for r in heated} == {(m, s) for m in ("none", "reinforce") for s in ("0", "1")}
    for r in heated:
        assert 0.0 <= float(r["heated/shifted/accuracy"]) <= 1.0
        assert (r["diagnostics/kl_uniform"] == "") == (r["method"] == "none")
    assert "shortcut_gap" in rows[0] and "`shortcut_gap`" in md
    precision = json.loads((out / "study.json").read_text())["config"]["precision"]
    assert precision in ("bf16", "fp32") and f"classifiers trained in {precision}, evaluated in fp32" in md
    for line in ("| none | 2 |", "| reinforce | 2 |", "| scratch | 2 |"):
        assert md.count(line) >= 2, line
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = json.loads((out / "study.json").read_text())
    assert study["counts"] == {"pretrain": {"reused": 0, "resumed": 0, "ran": 4},
                               "finetune": {"reused": 0, "resumed": 0, "ran": 12}}


class Interrupt(Exception):
    pass


def test_a_finished_run_of_an_algo_with_registered_settings_is_reused(tmp_path: Path) -> None:
    """reinforce-budget records the environment and options its name registers: a rerun of the study reuses its run
    instead of refusing the folder as another study's."""
    cfg = StudyConfig(methods=("reinforce-budget",), seeds=(0,), pretrain_dataset=PRETRAIN, targets=(), image_size=16,
                      grid=4, blur_kernel=3, blur_sigma=1.0, batch_size=8, pretrain_steps=2, device="cpu",
                      out=str(tmp_path / "study"))
    Study(cfg).run()
    again = Study(cfg)
    again.run()
    assert [r.status for r in again.records] == ["reused"]


def test_interrupted_study_resumes_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StudyConfig(methods=("none", "uniform-mask", "scratch"), seeds=(0, 1), pretrain_dataset=PRETRAIN,
                      targets=(UNSEEN,), image_size=16, grid=4, blur_kernel=3, blur_sigma=1.0, batch_size=8,
                      pretrain_steps=3, finetune_epochs=2, device="cpu", out=str(tmp_path / "study"))
    reference = Study(cfg)
    reference.run()
    expected = read_csv(reference.out / "results.csv")

    # A copy of the finished study, interrupted in the second epoch of the fine-tuning of uniform-mask, seed 1
    # (after its epoch-1 checkpoint); then one pretraining run loses its heated.pt and one fine-tuning run its folder.
    shutil.copytree(tmp_path / "study", tmp_path / "interrupted")
    cfg.out = str(tmp_path / "interrupted")
    study = Study(cfg)
    cut = Path(study.finetune_run("uniform-mask", 1, UNSEEN).run_dir)
    shutil.rmtree(cut)
    step = Finetuner.train_step

    def train_step(self, images, labels):
        if self.run_dir == cut and self.global_step == 8:
            raise Interrupt
        step(self, images, labels)

    monkeypatch.setattr(Finetuner, "train_step", train_step)
    with pytest.raises(Interrupt):
        study.run()
    monkeypatch.undo()
    assert (cut / "checkpoint.pt").is_file() and not (cut / "metrics.json").exists()
    (study.pretrain_dir("none", 1) / "heated.pt").unlink()
    shutil.rmtree(study.finetune_run("scratch", 1, UNSEEN).run_dir)

    resumed = Study(cfg)
    rows = resumed.run()
    assert resumed.counts() == {"pretrain": {"reused": 3, "resumed": 1, "ran": 0},
                                "finetune": {"reused": 4, "resumed": 1, "ran": 1}}
    strip = [{k: v for k, v in r.items() if not k.endswith("_dir")} for r in expected]
    assert [{k: str(v) for k, v in r.items() if not k.endswith("_dir")} for r in rows] == strip

    # New fine-tuning settings: every pretraining run is reused, every fine-tuning run is new.
    cfg.finetune_epochs = 1
    again = Study(cfg)
    again.run()
    assert again.counts() == {"pretrain": {"reused": 4, "resumed": 0, "ran": 0},
                              "finetune": {"reused": 0, "resumed": 0, "ran": 6}}


def test_paired_difference_by_hand() -> None:
    mean, low, high, n = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.302652729911275 / 3**0.5  # t(0.975, 2 degrees of freedom) * sd 1 / sqrt(3)
    assert (mean, n) == (2.0, 3) and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    mean, low, high, n = paired_difference([0.7], [0.5])
    assert mean == pytest.approx(0.2) and n == 1 and low != low and high != high


def test_the_paired_test_agrees_with_the_interval() -> None:
    # t = 2 / (1 / sqrt 3) with 2 degrees of freedom: two-sided p = 0.0742 (scipy.stats.t.sf(2 * 3**0.5, 2) * 2)
    assert paired_p_value([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == pytest.approx(0.07418, abs=1e-5)
    assert paired_p_value([0.7], [0.5]) != paired_p_value([0.7], [0.5])  # NaN: one pair
    assert paired_p_value([0.3, 0.3], [0.1, 0.1]) == 0.0 and paired_p_value([0.1, 0.2], [0.1, 0.2]) == 1.0
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.normal(size=4), rng.normal(size=4)
        _, low, high, _ = paired_difference(a, b)
        assert (paired_p_value(a, b) < 0.05) == (low > 0 or high < 0)


def test_a_family_of_tests_keeps_only_what_stands_at_a_false_discovery_rate() -> None:
    # Benjamini-Hochberg by hand: sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.053, 0.053, 0.5
    assert discoveries([0.01, 0.04, 0.03, 0.5]) == [True, False, False, False]
    assert discoveries([0.01, float("nan"), 0.02]) == [True, False, True]  # NaN is no test: two in the family
    assert discoveries([]) == []


def test_the_summary_marks_the_differences_that_stand_over_the_whole_table() -> None:
    # Seed-paired accuracies: "big" gains 0.1 on every seed (stands), "edge" gains on every seed but little and
    # unevenly (p = 0.022 alone), and eight methods level with none make the family large enough to drop "edge".
    seeds = range(4)
    none = [0.50, 0.60, 0.55, 0.65]
    methods = {"none": none, "big": [v + 0.1 + 0.01 * s for s, v in zip(seeds, none)],
               "edge": [v + d for v, d in zip(none, [0.015, 0.03, 0.02, 0.01])]}
    methods |= {f"null{i}": [v + d for v, d in zip(none, np.roll([0.02, -0.02, 0.01, -0.01], i))] for i in range(8)}
    rows = [{"method": m, "seed": s, "target": "synthrad", "accuracy": v} for m, vals in methods.items()
            for s, v in zip(seeds, vals)]
    assert paired_p_value(methods["edge"], none) < 0.05
    text = summary_markdown(rows, [], StudyConfig(methods=tuple(methods)), ("synthrad",))
    cell = dict(line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| "))
    assert cell["big"].endswith(")*") and cell["edge"].endswith(")") and not cell["null0"].endswith("*")
    assert "over the table's 10 paired t-tests" in text


def test_targets_and_methods_are_checked() -> None:
    assert parse_target("synthrad:unseen?n_train=60@10") == ("synthrad:unseen?n_train=60", 10)
    assert parse_target("imagefolder:/data/x") == ("imagefolder:/data/x", None)
    assert StudyConfig(pretrain_dataset="synthrad?seed=1", fewshot_k=5).resolved_targets() == (
        "synthrad?seed=1", "synthrad:shifted?seed=1", "synthrad:unseen?seed=1", "synthrad:unseen?seed=1@5",
        "linear:synthrad:shifted?seed=1", "synthrad?seed=1&modality_bias=0.3333")
    assert StudyConfig(pretrain_dataset="synthrad?modality_bias=0.3333").resolved_targets()[-1] == (
        "linear:synthrad:shifted?modality_bias=0.3333")  # pretrained on balanced data: no second balanced target
    assert StudyConfig(pretrain_dataset="imagefolder:/data/x").resolved_targets() == (
        "imagefolder:/data/x", "imagefolder:/data/x@10")
    with pytest.raises(ValueError, match="after '@'"):
        parse_target("synthrad@ten")
    with pytest.raises(ValueError, match="unknown method 'dqn'"):
        StudyConfig(methods=("none", "dqn")).validate()


def test_bias_sweep_prints_the_heated_shortcut_per_bias(tmp_path: Path, capsys) -> None:
    """--modality-biases pretrains at each bias (no fine-tuning) and prints one row per bias and method."""
    argv = ["--methods", "none", "--modality-biases", "0.3333", "0.95", "--seeds", "0", "1", "--pretrain-dataset",
            PRETRAIN, "--out", str(tmp_path / "sweep"), *TINY]
    assert compare.main(argv) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.")]
    assert [line.split(" | ")[:3] for line in table] == [["| 0.333", "none", "2"], ["| 0.95", "none", "2"]]
    for bias, folder in (("0.3333", "bias-0.3333"), ("0.95", "bias-0.95")):
        saved = next((tmp_path / "sweep" / folder / "pretrain").glob("none__s0__*/config.json"))
        config = json.loads(saved.read_text())
        assert f"modality_bias={bias}" in config["env"]["dataset"]
        assert not (tmp_path / "sweep" / folder / "finetune").exists()
        assert (tmp_path / "sweep" / folder / "heated.csv").is_file()


def test_pretraining_only_study_refuses_scratch() -> None:
    with pytest.raises(ValueError, match="scratch trains on a target"):
        StudyConfig(methods=("none", "scratch"), targets=()).validate()


def test_linear_probe_targets() -> None:
    """linear:DATASET[@K] is a linear probe on frozen features at probe_lr, in its own folder and label."""
    from agents.study import target_folder, target_label

    assert parse_target("linear:synthrad:shifted@5") == ("synthrad:shifted", 5)
    assert target_folder("linear:synthrad:shifted?n_train=96") == "synthrad-shifted-linear"
    assert target_label("linear:synthrad:shifted") == "synthrad:shifted, linear probe"
    # a modality-balanced target is another task than the pretraining one: its own folder and label
    assert target_folder("synthrad?n_train=96&modality_bias=0.3333") == "synthrad-bias0.3333"
    assert target_folder("synthrad?n_train=96") == "synthrad"
    assert target_label("synthrad?modality_bias=0.3333@5") == "synthrad (modality_bias 0.3333) (K=5)"
    cfg = StudyConfig(probe_lr=0.3, targets=("linear:synthrad:shifted", "synthrad:shifted"))
    probe, full = (cfg.finetune_config("x/heated.pt", t, 0) for t in cfg.targets)
    assert (probe.linear_probe, probe.lr, probe.dataset) == (True, 0.3, "synthrad:shifted")
    assert (full.linear_probe, full.lr, full.schedule) == (False, DEFAULT_LR["heated"], "cosine")
    scratch = cfg.finetune_config(SCRATCH, "synthrad:shifted", 0)
    assert scratch.lr == DEFAULT_LR[SCRATCH] and scratch.schedule == "cosine"  # the same recipe for scratch
    paper = StudyConfig(finetune_lr=1e-3, finetune_schedule="constant").finetune_config("x/heated.pt", "synthrad", 0)
    assert (paper.lr, paper.schedule) == (1e-3, "constant")


def test_diagnostics_over_the_run_keep_the_extreme_value_and_its_step(tmp_path: Path) -> None:
    """A pattern that fades before the end shows in ``peak/*``: the largest value (the content gap: in magnitude, with
    its sign) over the logged windows, and its step."""
    from agents.study import diagnostics_over_run

    path = tmp_path / "metrics.jsonl"
    records = [{"step": 10, "train/loss": 2.0},
               {"step": 20, "diagnostics/kl_initial": 0.5, "diagnostics/content_gap": -0.40,
                "diagnostics/image_spread": 0.2},
               {"step": 40, "diagnostics/kl_initial": 3.0, "diagnostics/content_gap": 0.10,
                "diagnostics/image_spread": 0.1},
               {"step": 60, "diagnostics/kl_initial": 0.2, "diagnostics/content_gap": 0.01,
                "diagnostics/image_spread": 0.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    peaks = diagnostics_over_run(path)
    assert peaks == {"peak/kl_initial": 3.0, "peak/kl_initial_step": 40, "peak/content_gap": -0.40,
                     "peak/content_gap_step": 20, "peak/image_spread": 0.2, "peak/image_spread_step": 20}
    assert diagnostics_over_run(tmp_path / "missing.jsonl") == {}


def test_run_setting_names_how_each_policy_learned(tmp_path: Path) -> None:
    """The study names the parameterisation and learning rate each learned method ran with, defaults resolved."""
    from dataclasses import asdict

    from agents.runner import PretrainConfig
    from agents.study import run_setting
    from envs.core import EnvConfig

    def setting(algo: str, agent: dict, **env) -> str:
        path = tmp_path / f"{algo}.json"
        path.write_text(json.dumps(asdict(PretrainConfig(algo=algo, env=EnvConfig(**env), agent=agent))))
        return run_setting(path)

    assert "param exp" in setting("reinforce", {}) and "policy_lr 0.01" in setting("reinforce", {})  # lr 0.1 / 10
    budget = setting("reinforce-budget", {"param": "softplus", "policy_lr": 0.03, "budget_concentration": 2.0},
                     reward="adversarial", mask_budget=0.5)
    assert "reward adversarial, mask_budget 0.5" in budget and "budget_concentration 2.0" in budget
    assert setting("none", {}) == "" and run_setting(tmp_path / "missing.json") == ""


def test_a_changed_agent_default_names_another_pretraining_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent's options are in a pretraining run's key with their defaults resolved: when the code's default
    changes (as PPO's clipping did), a study makes a new run instead of reusing one trained under the old default."""
    from dataclasses import dataclass

    import agents.reinforce as reinforce_module

    study = Study(StudyConfig(methods=("none", "reinforce"), seeds=(0,), targets=(), device="cpu",
                              out=str(tmp_path / "s")))
    before = {m: study.pretrain_dir(m, 0) for m in ("none", "reinforce")}

    @dataclass
    class Changed(reinforce_module.ReinforceConfig):
        param: str = "softplus"

    monkeypatch.setattr(reinforce_module, "ReinforceConfig", Changed)
    assert study.pretrain_dir("reinforce", 0) != before["reinforce"]
    assert study.pretrain_dir("none", 0) == before["none"]
