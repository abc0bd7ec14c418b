"""scripts/pretrain.py end to end: the run folder, the heated model, TensorBoard's files, resuming, refusing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pretrain
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.registry import algo_names
from agents.runner import PretrainRunner
from classifiers.heated import FORMAT, load_heated
from classifiers.models import build_classifier

ROOT = Path(__file__).resolve().parents[1]
SB3_ALGOS = {"ppo", "a2c", "ppo-budget", "a2c-budget"}
"""Covered by tests/test_sb3.py (the budgeted ones by tests/test_budget.py)."""
ALGOS = [a for a in algo_names() if a not in SB3_ALGOS]
COMMON_SCALARS = {"train/loss", "train/accuracy", "train/lr", "train/epoch", "reward/mean", "reward/std",
                  "perf/images_per_second", "perf/overhead", "val/loss", "val/accuracy", "val/balanced_accuracy",
                  "val/macro_f1", "val/roc_auc"}
MASK_SCALARS = {"mask/mean", "mask/std"}
POLICY_SCALARS = {"policy/loss", "policy/entropy_per_cell", "policy/advantage_mean", "policy/advantage_std",
                  "policy/grad_norm_before_clip", "policy/baseline", "policy/alpha_mean", "policy/beta_mean",
                  "policy/lr"}
LEARNING = {"reinforce", "reinforce-official", "reinforce-official-scaled", "reinforce-budget", "reinforce-lff",
            "reinforce-lff-blend"}
MASKING = LEARNING | {"uniform-mask", "uniform-blend", "saliency-mask"}


@pytest.fixture(scope="module")
def script():
    """``scripts/pretrain.py`` as a module (``scripts`` is on pytest's path)."""
    return pretrain


def tiny_args(spec: str, run_dir: Path, algo: str, steps: int = 4) -> list[str]:
    """smallcnn at 32 px, grid 8, batch 16 (15 steps an epoch): a log, an image grid and a checkpoint every 2 steps."""
    return ["--algo", algo, "--dataset", spec, "--classifier", "smallcnn", "--image-size", "32", "--grid", "8",
            "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "16", "--max-steps", str(steps),
            "--device", "cpu", "--log-every", "2", "--image-every", "2", "--ckpt-every", "2",
            "--run-dir", str(run_dir)]


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algo_writes_a_complete_run_folder(algo: str, script, synthrad_spec: str, tmp_path: Path,
                                                  capsys) -> None:
    run_dir = tmp_path / algo
    assert script.main(tiny_args(synthrad_spec, run_dir, algo)) == 0
    out = capsys.readouterr().out
    assert f"run folder: {run_dir}" in out and "tensorboard --logdir" in out

    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "heated.pt"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == algo and config["env"]["grid"] == 8 and config["max_steps"] == 4

    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert any("val/accuracy" in r for r in rows)

    # heated.pt: tensors and plain values only, naming what rebuilds the classifier
    blob = torch.load(run_dir / "heated.pt", weights_only=True)
    assert blob["format"] == FORMAT
    assert (blob["arch"], blob["num_classes"], blob["in_channels"], blob["image_size"]) == ("smallcnn", 12, 1, 32)
    assert blob["meta"]["algo"] == algo and blob["meta"]["steps"] == 4
    model = build_classifier(blob["arch"], blob["num_classes"], blob["in_channels"], blob["image_size"])
    model.load_state_dict(blob["state_dict"])
    heated, info = load_heated(run_dir / "heated.pt")
    assert info["class_names"] == blob["class_names"] and len(info["class_names"]) == 12
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["core"]["classifier"]
    for k, v in heated.state_dict().items():
        assert torch.equal(v, saved[k]), k
    with torch.no_grad():
        assert heated.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 12)

    tags = events(run_dir).Tags()
    expected = COMMON_SCALARS | (MASK_SCALARS if algo in MASKING else set()) | \
        (POLICY_SCALARS if algo in LEARNING else set())
    assert expected <= set(tags["scalars"]), expected - set(tags["scalars"])
    if algo in MASKING:
        assert tags["images"] == ["images/probe_masks"]
        assert "mask/values" in tags["histograms"]
    else:
        assert not tags["images"] and not tags["histograms"]


def test_tensorboard_holds_scalars_images_histograms_and_hyperparameters(script, synthrad_spec: str,
                                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "tb"
    assert script.main(tiny_args(synthrad_spec, run_dir, "reinforce")) == 0
    acc = events(run_dir)
    for tag in ("train/loss", "train/accuracy", "reward/mean", "policy/loss", "policy/entropy_per_cell", "mask/mean",
                "perf/images_per_second"):
        values = acc.Scalars(tag)
        assert [e.step for e in values] == [2, 4], tag
        assert all(torch.isfinite(torch.tensor(e.value)) for e in values), tag
    assert [e.step for e in acc.Scalars("val/accuracy")] == [4]
    assert 0.0 <= acc.Scalars("val/accuracy")[0].value <= 1.0
    assert all(e.value > 0 for e in acc.Scalars("perf/images_per_second"))
    assert all(0.0 <= e.value < 1.0 for e in acc.Scalars("perf/overhead"))
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("mask/mean"))

    # the same scalars in metrics.jsonl as in TensorBoard
    rows = {r["step"]: r for r in metrics(run_dir) if "train/loss" in r}
    for e in acc.Scalars("train/loss"):
        assert rows[e.step]["train/loss"] == pytest.approx(e.value, rel=1e-6)

    pictures = acc.Images("images/probe_masks")
    assert [e.step for e in pictures] == [1, 2, 4]  # the first step, every --image-every, the last
    assert pictures[0].width > 4 * 32 and pictures[0].encoded_image_string[:4] == b"\x89PNG"
    hist = acc.Histograms("mask/values")
    assert [e.step for e in hist] == [1, 2, 4]
    assert hist[0].histogram_value.num == 16 * 8 * 8  # every cell of the batch's grids
    assert 0.0 <= hist[0].histogram_value.min and hist[0].histogram_value.max <= 1.0

    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    for row in ("|algo|reinforce|", "|env.grid|8|", "|env.classifier|smallcnn|", "|max_steps|4|",
                "|agent.baseline_momentum|0.9|", "|agent.param|exp|"):  # the agent's defaults, resolved
        assert row in text, row
    legend = acc.Tensors("about/legend/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "white" in legend and all(f"`{group}/`" in legend for group in
                                     ("train", "val", "val_perturbed", "reward", "policy", "mask", "diagnostics",
                                      "perf", "heated"))

    # the heated figures: every one in metrics.jsonl and the Text tab's table, the key ones as scalars
    heated = metrics(run_dir)[-1]
    assert sum(k.startswith("heated/") for k in heated) > 20
    assert {t for t in acc.Tags()["scalars"] if t.startswith("heated/")} == {
        "heated/test/accuracy", "heated/test_perturbed/accuracy", "heated/test/shortcut_gap",
        "heated/test/worst_group_accuracy"}
    table = acc.Tensors("heated/table/text_summary")[0].tensor_proto.string_val[0].decode().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["test", "test, perturbed", "shifted",
                                                                 "shifted, perturbed"]
    assert f"{heated['heated/shifted_perturbed/macro_f1']:.3f}" in table[5]


def test_eval_every_validates_clean_and_perturbed_within_an_epoch(script, synthrad_spec: str, tmp_path: Path) -> None:
    """--eval-every 2 in a 5-step run: validation at steps 2 and 4 and at the end, on clean inputs and on inputs
    masked as in training; an agent that does not perturb its inputs has no perturbed curve."""
    for algo in ("reinforce", "none"):
        run_dir = tmp_path / algo
        args = tiny_args(synthrad_spec, run_dir, algo, steps=5)
        assert script.main([*args, "--eval-every", "2"]) == 0
        rows = metrics(run_dir)
        assert [r["step"] for r in rows if "val/accuracy" in r] == [2, 4, 5]
        perturbed = [r["step"] for r in rows if "val_perturbed/accuracy" in r]
        assert perturbed == ([2, 4, 5] if algo == "reinforce" else [])
        assert json.loads((run_dir / "config.json").read_text())["eval_every"] == 2
    with pytest.raises(ValueError, match="eval_every 0 must be at least 1"):
        script.main([*tiny_args(synthrad_spec, tmp_path / "bad", "none"), "--eval-every", "0"])


def optimizer_buffers(state: dict) -> list[torch.Tensor]:
    return [s["momentum_buffer"] for _, s in sorted(state["state"].items())]


def test_resume_continues_the_step_count_and_the_optimiser_state(script, synthrad_spec: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "resume"
    args = tiny_args(synthrad_spec, run_dir, "reinforce")
    assert script.main(args) == 0
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["core"]["global_step"] == 4

    longer = [*args[: args.index("--max-steps")], "--max-steps", "7", *args[args.index("--max-steps") + 2 :],
              "--resume"]
    runner = PretrainRunner(script.config_from_args(script.parse_args(longer)), resume=True)
    assert runner.core.global_step == 4 and runner.total_steps == 7
    classifier_buffers = optimizer_buffers(runner.core.optimizer.state_dict())
    policy_buffers = optimizer_buffers(runner.agent.optimizer.state_dict())
    assert len(classifier_buffers) == len(list(runner.core.classifier.parameters()))
    assert len(policy_buffers) == len(list(runner.agent.policy.parameters()))
    for got, want in zip(classifier_buffers, optimizer_buffers(saved["core"]["optimizer"])):
        assert torch.equal(got, want)
    for got, want in zip(policy_buffers, optimizer_buffers(saved["agent"]["optimizer"])):
        assert torch.equal(got, want)
    assert runner.agent.scheduler.last_epoch == 4
    # an extended run anneals the policy's lr to 0 over its new length, from where it stands
    base_lr = runner.agent.scheduler.base_lrs[0]
    lr_now = runner.agent.optimizer.param_groups[0]["lr"]
    assert lr_now == pytest.approx(0.5 * base_lr * (1 + math.cos(math.pi * 4 / 7)))
    torch.testing.assert_close(runner.agent.policy.base, saved["agent"]["policy"]["base"], rtol=0, atol=0)
    runner.logger.close()

    assert script.main(longer) == 0
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert final["core"]["global_step"] == 7
    assert final["agent"]["scheduler"]["last_epoch"] == 7
    assert final["agent"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    steps = [r["step"] for r in metrics(run_dir) if "train/loss" in r]
    assert steps == sorted(steps) and steps[-1] == 7 and steps[:2] == [2, 4]
    assert [e.step for e in events(run_dir).Scalars("train/loss")] == steps
    assert torch.load(run_dir / "heated.pt", weights_only=True)["meta"]["steps"] == 7


def test_existing_run_folder_is_refused_without_resume(script, synthrad_spec: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "taken"
    args = tiny_args(synthrad_spec, run_dir, "none", steps=2)
    assert script.main(args) == 0
    before = (run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        script.main(args)
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert script.fail_cleanly(lambda: script.main(args)) == 2


def test_a_checkpoint_the_code_no_longer_fits_is_refused_in_one_line(script, synthrad_spec: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A run resumed after a default of the agent changed (here the policy's width) gets one line naming the run folder
    and the fix, and its files stay as they were."""
    from dataclasses import dataclass

    import agents.reinforce as reinforce_module
    from classifiers.cli import fail_cleanly

    run_dir = tmp_path / "run"
    assert script.main(tiny_args(synthrad_spec, run_dir, "reinforce", steps=2)) == 0
    saved = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    @dataclass
    class Wider(reinforce_module.ReinforceConfig):
        policy_width: int = 8

    monkeypatch.setattr(reinforce_module, "ReinforceConfig", Wider)
    capsys.readouterr()
    argv = [*tiny_args(synthrad_spec, run_dir, "reinforce", steps=4), "--resume"]
    assert fail_cleanly(lambda: script.main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the checkpoint in {run_dir} does not fit" in err and "--run-dir" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == saved


def test_the_runs_bookkeeping_is_kept_off_images_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """A window's images per second count its steps' time only; the bookkeeping between steps (logging, image grids,
    evaluation, checkpoints), also when it closes the window midway or nests (a checkpoint written inside the
    after-step bookkeeping), is kept off it once and reported as ``perf/overhead``."""
    from classifiers import runlog

    now = [0.0]
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: now[0])
    window, throughput = runlog.ScalarWindow(), runlog.Throughput()
    now[0] = 1.0  # one second of steps, then two of bookkeeping
    with window.paused():
        now[0] = 2.0
        with window.paused():  # nested: counted once
            now[0] = 3.0
    assert window.elapsed() == 1.0
    closed = throughput.close(window, images=64)
    assert closed == {"perf/images_per_second": 64.0, "perf/overhead": pytest.approx(2 / 3)}
    window.reset()
    now[0] = 4.0  # a second of steps; then bookkeeping that closes the window, resets it and evaluates for a second
    with window.paused():
        assert throughput.close(window, images=32) == {"perf/images_per_second": 32.0, "perf/overhead": 0.0}
        window.reset()
        now[0] = 5.0
    now[0] = 6.0  # a second of steps in the new window: the evaluation after its reset is off its clock
    assert window.elapsed() == 1.0
    assert throughput.close(window, images=32) == {"perf/images_per_second": 32.0, "perf/overhead": 0.5}
