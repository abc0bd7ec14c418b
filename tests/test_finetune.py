"""Fine-tuning: the warm-up schedule, the head, the few-shot cap, end-to-end runs and exact resumption."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from agents.runner import PretrainConfig, pretrain
from classifiers.data import DataSpec
from classifiers.finetune import DEFAULT_LR, WARMUP_START, FinetuneConfig, Finetuner, finetune, fit_head, lr_at
from classifiers.heated import load_heated
from classifiers.metrics import METRIC_NAMES
from classifiers.models import build_classifier
from envs.core import EnvConfig

ROOT = Path(__file__).resolve().parents[1]
UNSEEN = "synthrad:unseen?n_train=96&n_val=24&n_test=24"
"""6 classes x 16 training images."""


@pytest.fixture(scope="module")
def heated(tmp_path_factory: pytest.TempPathFactory, synthrad_spec: str) -> Path:
    """A heated.pt of a tiny REINFORCE pretraining run: smallcnn, grayscale, 16 px, 12 classes."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "reinforce"
    env = EnvConfig(dataset=synthrad_spec, image_size=16, grid=4, blur_kernel=3, blur_sigma=1.0, batch_size=8,
                    device="cpu")
    pretrain(PretrainConfig(algo="reinforce", env=env, max_steps=3, run_dir=str(run_dir)))
    return run_dir / "heated.pt"


def tiny(tmp_path: Path, **kwargs) -> FinetuneConfig:
    options = dict(dataset=UNSEEN, epochs=1, batch_size=8, device="cpu", run_dir=str(tmp_path / "ft"))
    return FinetuneConfig(**(options | kwargs))


# The schedule.

def test_warmup_is_linear_per_step_then_constant() -> None:
    lrs = [lr_at(t, 1.0, warmup_steps=4, total_steps=8, schedule="constant") for t in range(8)]
    assert lrs[:4] == pytest.approx([WARMUP_START + (1 - WARMUP_START) * t / 4 for t in range(4)])
    assert lrs[0] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.505)
    assert lrs[4:] == [1.0] * 4


def test_cosine_after_warmup_by_default() -> None:
    lrs = [lr_at(t, 2.0, warmup_steps=4, total_steps=8) for t in range(8)]  # the default schedule
    assert lrs[3] == pytest.approx(2.0 * (0.01 + 0.99 * 3 / 4))
    assert lrs[4:] == pytest.approx([2.0 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert lrs[6] == pytest.approx(1.0)


def test_no_warmup() -> None:
    assert lr_at(0, 0.1, warmup_steps=0, total_steps=5) == 0.1


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        tiny(tmp_path, init=str(tmp_path / "missing.pt")).validate()
    with pytest.raises(ValueError, match="learning rate -1"):
        tiny(tmp_path, lr=-1).validate()
    with pytest.raises(ValueError, match="unknown schedule"):
        tiny(tmp_path, schedule="step").validate()
    with pytest.raises(ValueError, match="train_per_class 0"):
        tiny(tmp_path, train_per_class=0).validate()


# The head.

def _spec(num_classes: int, names: list[str] | None = None) -> DataSpec:
    return DataSpec("t", names or [f"c{i}" for i in range(num_classes)], 1, 16, {})


def _cfg(**kwargs) -> FinetuneConfig:
    return FinetuneConfig(init="heated.pt", **kwargs)


def test_head_kept_when_the_class_count_matches() -> None:
    model = build_classifier("smallcnn", 6, 1, 16)
    fc = model.fc.weight.detach().clone()
    info = {"arch": "smallcnn", "class_names": [f"c{i}" for i in range(6)]}
    model, head = fit_head(model, info, _spec(6), _cfg())
    assert head == "kept" and torch.equal(model.fc.weight, fc)


def test_head_replaced_when_the_class_count_differs_or_asked() -> None:
    model = build_classifier("smallcnn", 12, 1, 16)
    trunk = model.features[0][0].weight.detach().clone()
    model, head = fit_head(model, {"arch": "smallcnn", "class_names": []}, _spec(6), _cfg())
    assert head == "replaced" and model.fc.out_features == 6
    assert torch.equal(model.features[0][0].weight, trunk)
    fc = model.fc.weight.detach().clone()
    model, head = fit_head(model, {"arch": "smallcnn", "class_names": []}, _spec(6), _cfg(new_head=True, seed=3))
    assert head == "replaced" and not torch.equal(model.fc.weight, fc)


def test_kept_head_with_other_class_names_warns() -> None:
    model = build_classifier("smallcnn", 2, 1, 16)
    with pytest.warns(UserWarning, match="--new-head"):
        fit_head(model, {"arch": "smallcnn", "class_names": ["a", "b"]}, _spec(2, ["x", "y"]), _cfg())


def test_architecture_mismatch_names_both(tmp_path: Path, heated: Path) -> None:
    with pytest.raises(ValueError, match="holds a smallcnn but --classifier resnet18"):
        Finetuner(tiny(tmp_path, init=str(heated), classifier="resnet18"))


# End to end.

def test_finetune_heated_on_unseen_with_few_shot_cap(tmp_path: Path, heated: Path) -> None:
    cfg = tiny(tmp_path, init=str(heated), train_per_class=3, epochs=2, batch_size=32, log_every=1, ckpt_every=1)
    with pytest.warns(UserWarning, match="batch size lowered from 32 to 18"):
        run_dir = finetune(cfg)
    for name in ("config.json", "metrics.jsonl", "metrics.json", "model.pt", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["split"] == "test" and m["num_images"] == 24 and m["head"] == "replaced"
    assert m["train_images"] == 6 * 3 and m["steps"] == 2  # the few-shot cap: 3 per class, one batch of 18 per epoch
    for k in METRIC_NAMES:
        assert 0.0 <= m[k] <= 1.0, k
    assert sum(map(sum, m["confusion_matrix"])) == 24 and len(m["confusion_matrix"]) == 6
    model, info = load_heated(run_dir / "model.pt")
    assert info["num_classes"] == 6 and info["in_channels"] == 1 and info["arch"] == "smallcnn"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lr = json.loads((run_dir / "config.json").read_text())["lr"]  # chosen (lr auto); the decay starts after warm-up
    assert [r["train/lr"] for r in rows if "train/lr" in r] == pytest.approx([lr * WARMUP_START, lr])
    assert {f"val/{k}" for k in METRIC_NAMES} <= set(rows[-2]) and {f"test/{k}" for k in METRIC_NAMES} <= set(rows[-1])


def test_colour_imagefolder_of_another_size_into_a_grayscale_model(tmp_path: Path, heated: Path,
                                                                   make_imagefolder) -> None:
    root = make_imagefolder(mode="RGB", size=(40, 30), per_class=8, splits=("train", "val"))
    run_dir = finetune(tiny(tmp_path, init=str(heated), dataset=f"imagefolder:{root}"))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["split"] == "val" and m["num_images"] == 24 and m["head"] == "replaced"
    assert m["class_names"] == ["cat", "dog", "eel"]
    _, info = load_heated(run_dir / "model.pt")
    assert (info["in_channels"], info["image_size"], info["num_classes"]) == (1, 16, 3)


def test_scratch_on_the_pretraining_task_and_the_cli(tmp_path: Path, synthrad_spec: str, capsys) -> None:
    import finetune as script
    argv = ["--init", "scratch", "--dataset", synthrad_spec, "--image-size", "16", "--epochs", "1",
            "--batch-size", "16", "--device", "cpu", "--run-dir", str(tmp_path / "scratch"), "--channels", "3"]
    assert script.main(argv) == 0
    assert "test split (48 images, head new)" in capsys.readouterr().out
    _, info = load_heated(tmp_path / "scratch" / "model.pt")
    assert (info["arch"], info["in_channels"], info["num_classes"]) == ("smallcnn", 3, 12)


# Resumption.

class Interrupt(Exception):
    pass


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_heated(run_dir / "model.pt")[0].state_dict()


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_interrupted_run_resumes_exactly(tmp_path: Path, heated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 12 steps per epoch, 2 epochs; checkpoints at steps 5, 10, 12 (epoch end), 15, 20, 24 (epoch end).
    options = dict(init=str(heated), epochs=2, log_every=2, ckpt_every=5, warmup_epochs=0.5, schedule="cosine",
                   lr=None)
    whole = finetune(tiny(tmp_path, run_dir=str(tmp_path / "whole"), **options))

    cfg = tiny(tmp_path, run_dir=str(tmp_path / "cut"), **options)
    step = Finetuner.train_step

    def train_step(self, images, labels):
        if self.global_step == 19:  # in epoch 2, after the checkpoint of step 15
            raise Interrupt
        step(self, images, labels)

    monkeypatch.setattr(Finetuner, "train_step", train_step)
    with pytest.raises(Interrupt):
        finetune(cfg)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        finetune(cfg)
    with pytest.raises(ValueError, match=r"lr=0.1 \(now 0.01\)"):  # the default, resolved and recorded
        finetune(tiny(tmp_path, run_dir=str(tmp_path / "cut"), **(options | {"lr": 0.01})), resume=True)
    cut = finetune(cfg, resume=True)

    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(whole) == _metrics(cut)
    assert json.loads((whole / "metrics.json").read_text()) == json.loads((cut / "metrics.json").read_text())


def test_damaged_checkpoint_falls_back_to_the_previous(tmp_path: Path, heated: Path) -> None:
    cfg = tiny(tmp_path, init=str(heated), epochs=1, ckpt_every=4)
    run_dir = finetune(cfg)
    (run_dir / "checkpoint.pt").write_bytes(b"half-written")
    with pytest.warns(UserWarning, match="checkpoint.prev.pt"):
        finetune(cfg, resume=True)
    assert (run_dir / "metrics.json").is_file()


def test_linear_probe_trains_the_head_alone_and_saves_a_plain_classifier(tmp_path: Path) -> None:
    """--linear-probe: only a fresh fc layer learns; every other weight and BatchNorm statistic stays as in the heated
    model; model.pt is the plain classifier again."""
    from classifiers.heated import save_heated
    from classifiers.models import build_classifier

    torch.manual_seed(0)
    heated = build_classifier("smallcnn", 12, 1, 16)
    save_heated(tmp_path / "heated.pt", heated, "smallcnn", 12, 1, 16)
    run = tmp_path / "probe"
    argv = ["--init", str(tmp_path / "heated.pt"), "--dataset", "synthrad?n_train=96&n_val=24&n_test=24",
            "--epochs", "2", "--batch-size", "16", "--lr", "0.1", "--linear-probe", "--device", "cpu",
            "--run-dir", str(run)]
    import finetune as script

    assert script.main(argv) == 0
    model, _ = load_heated(run / "model.pt")
    before, after = heated.state_dict(), model.state_dict()
    assert set(before) == set(after)
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != k.startswith("fc."), k  # the head was replaced and trained; nothing else moved
    assert json.loads((run / "metrics.json").read_text())["head"] == "replaced"


# The default recipe.

def test_the_rate_defaults_by_start_and_runs_record_it(tmp_path: Path) -> None:
    """lr None resolves to the start's fixed rate (scratch, heated, linear probe); a given rate stays, and so does the
    default, auto (tests/test_finetune_lr.py); config.json records the resolved one; a run saved before ``schedule``
    existed ran at a constant rate and reads so."""
    assert tiny(tmp_path, lr=None).resolved().lr == DEFAULT_LR["scratch"]
    assert tiny(tmp_path, init="x/heated.pt", lr=None).resolved().lr == DEFAULT_LR["heated"]
    assert tiny(tmp_path, init="x/heated.pt", linear_probe=True, lr=None).resolved().lr == DEFAULT_LR["linear_probe"]
    assert tiny(tmp_path, lr=0.003).resolved().lr == 0.003
    assert tiny(tmp_path).resolved().lr == "auto"
    assert tiny(tmp_path).schedule == "cosine"
    old = {k: v for k, v in asdict(tiny(tmp_path, lr=1e-3)).items() if k != "schedule"}
    assert FinetuneConfig.from_dict(old).schedule == "constant"
    run_dir = finetune(tiny(tmp_path, dataset="synthrad:unseen?n_train=24&n_val=12&n_test=12", image_size=16,
                            lr=None))
    assert json.loads((run_dir / "config.json").read_text())["lr"] == DEFAULT_LR["scratch"]


STABLE = dict(dataset="synthrad:unseen?n_train=600&n_val=300&n_test=12", image_size=24, channels=1, epochs=5,
              batch_size=32, seed=1, log_every=1000, ckpt_every=10_000, precision="fp32", lr=DEFAULT_LR["scratch"])
"""A scratch run at the fixed default rate (0.1); at a constant rate, its last epoch lands 0.077 below its best on the
CPU of earlier sessions, 0.050 on an AMD EPYC with AVX-512 (family 25, model 17), 0.073 on an Intel Xeon with AMX. In
fp32 on every CPU: under ``auto`` the AMX Xeon trains in bf16, where the constant-rate run lands only 0.037 below (the
default recipe: 0.0 in both)."""


def _best_minus_final(run_dir: Path) -> tuple[float, list[float]]:
    lines = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    vals = [m["val/accuracy"] for m in lines if "val/accuracy" in m]
    return max(vals) - vals[-1], vals


def test_the_default_recipe_ends_within_a_small_margin_of_its_best_epoch(tmp_path: Path) -> None:
    """The final model of the default recipe (cosine decay) is within 0.02 validation accuracy of the run's best
    epoch, and it learned (0.45+ on 6 classes, chance 0.17). The control: the same run at the paper's constant rate
    ends at least 0.04 below its best (twice the margin), so the margin is one this measurement can miss."""
    gap, vals = _best_minus_final(finetune(tiny(tmp_path, **STABLE)))
    assert len(vals) == 5 and gap <= 0.02 and vals[-1] >= 0.45, vals
    gap, vals = _best_minus_final(finetune(tiny(tmp_path, schedule="constant", run_dir=str(tmp_path / "c"), **STABLE)))
    assert gap >= 0.04, vals  # twice the margin; 0.077 and 0.050 (15 of the 300 validation images) on two CPUs
