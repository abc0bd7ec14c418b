"""The fine-tuning rate chosen from the data (``lr="auto"``): recorded, read from validation only, fixed by --lr,
kept on resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from classifiers.data import ImageDataset
from classifiers.finetune import (
    AUTO,
    AUTO_CANDIDATES,
    AUTO_MAX_STEPS,
    AUTO_MIN_STEPS,
    DEFAULT_LR,
    PAPER_LR,
    FinetuneConfig,
    Finetuner,
    finetune,
    search_steps,
)
from classifiers.heated import load_heated

DATA = "synthrad:unseen?n_train=48&n_val=24&n_test=24"
"""6 classes x 8 training images: 6 steps of 8 per epoch."""


def tiny(tmp_path: Path, name: str = "ft", **kwargs) -> FinetuneConfig:
    options = dict(dataset=DATA, image_size=16, epochs=2, batch_size=8, device="cpu", log_every=2, ckpt_every=5,
                   run_dir=str(tmp_path / name))
    return FinetuneConfig(**(options | kwargs))


def _config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_heated(run_dir / "model.pt")[0].state_dict()


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_auto_is_the_default_and_its_cost_is_bounded() -> None:
    assert FinetuneConfig().lr == AUTO and FinetuneConfig(lr=None).resolved().lr == DEFAULT_LR["scratch"]
    assert FinetuneConfig().resolved().lr == AUTO  # resolved by the run, which records the rate chosen
    assert search_steps(7) == 7  # never more than the run
    assert search_steps(100) == AUTO_MIN_STEPS
    assert search_steps(2000) == 200
    assert search_steps(10**6) == AUTO_MAX_STEPS
    with pytest.raises(ValueError, match="'fast' must be a positive number or 'auto'"):
        FinetuneConfig(lr="fast").validate()


def test_the_choice_and_its_evidence_are_recorded_in_config_json(tmp_path: Path, capsys) -> None:
    run_dir = finetune(tiny(tmp_path))
    cfg = _config(run_dir)
    search = cfg["lr_search"]
    assert cfg["lr"] == search["chosen"] and search["chosen"] in AUTO_CANDIDATES
    assert [c["lr"] for c in search["candidates"]] == list(AUTO_CANDIDATES)
    assert search["split"] == "val" and search["run_steps"] == 12 and search["steps_per_candidate"] == 12
    assert search["seconds"] > 0 and "lr auto chose" in search["why"]
    usable = [c for c in search["candidates"] if not c["diverged"]]
    best = max(usable, key=lambda c: (c["val_accuracy"], -c["val_loss"]))
    assert best["lr"] == search["chosen"]
    assert search["why"] in capsys.readouterr().out  # printed in one line
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["train/lr"] for r in rows if "train/lr" in r) <= cfg["lr"]


def test_the_search_leaves_no_trace(tmp_path: Path) -> None:
    """The run after the search is, bit for bit, the run given the chosen rate: same weights, same logs."""
    auto = finetune(tiny(tmp_path, "auto"))
    fixed = finetune(tiny(tmp_path, "fixed", lr=_config(auto)["lr"]))
    a, b = _weights(auto), _weights(fixed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(auto) == _metrics(fixed)
    assert "lr_search" not in _config(fixed)


def test_the_search_never_reads_the_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image read is logged with whether the search was running: during it, training and validation images
    only; the test split is read afterwards, by the final evaluation (so the log would have caught it)."""
    reads: list[tuple[int, bool]] = []
    searching = [False]
    getitem, search = ImageDataset.__getitem__, Finetuner.search_rate

    def logged_getitem(self, item):
        reads.append((id(self.source), searching[0]))
        return getitem(self, item)

    def logged_search(self, *args, **kwargs):
        searching[0] = True
        try:
            return search(self, *args, **kwargs)
        finally:
            searching[0] = False

    monkeypatch.setattr(ImageDataset, "__getitem__", logged_getitem)
    monkeypatch.setattr(Finetuner, "search_rate", logged_search)
    tuner = Finetuner(tiny(tmp_path))
    tuner.run()
    split = {id(source): name for name, source in tuner.data.splits.items()}
    during = {split[s] for s, on in reads if on}
    after = {split[s] for s, on in reads if not on}
    assert during == {"train", "val"}
    assert "test" in after


def test_a_given_rate_is_used_without_a_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_search(self, *args, **kwargs):
        raise AssertionError("searched although --lr fixed the rate")

    monkeypatch.setattr(Finetuner, "search_rate", no_search)
    run_dir = finetune(tiny(tmp_path, lr=0.03))
    assert _config(run_dir)["lr"] == 0.03 and "lr_search" not in _config(run_dir)
    run_dir = finetune(tiny(tmp_path, "default", lr=None))  # the fixed default, as the study runs it
    assert _config(run_dir)["lr"] == DEFAULT_LR["scratch"]


class Interrupt(Exception):
    pass


def test_a_resumed_run_keeps_its_choice_and_does_not_search_again(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    whole = finetune(tiny(tmp_path, "whole"))
    cfg = tiny(tmp_path, "cut")
    step = Finetuner.train_step

    def train_step(self, images, labels):
        if self.global_step == 8:  # after the checkpoint of step 5
            raise Interrupt
        step(self, images, labels)

    monkeypatch.setattr(Finetuner, "train_step", train_step)
    with pytest.raises(Interrupt):
        finetune(cfg)
    monkeypatch.setattr(Finetuner, "train_step", step)
    chosen = _config(tmp_path / "cut")["lr"]
    other = next(lr for lr in AUTO_CANDIDATES if lr != chosen)
    with pytest.raises(ValueError, match=rf"lr={chosen} \(now {other}\)"):
        finetune(replace(cfg, lr=other), resume=True)

    def no_search(self, *args, **kwargs):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr(Finetuner, "search_rate", no_search)
    cut = finetune(cfg, resume=True)
    assert _config(cut)["lr"] == _config(whole)["lr"] == chosen
    untimed = [{k: v for k, v in _config(d)["lr_search"].items() if k not in ("seconds", "why")} for d in (cut, whole)]
    assert untimed[0] == untimed[1]  # the same search, made once
    a, b = _weights(whole), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(whole) == _metrics(cut)


def test_a_run_with_a_fixed_rate_is_not_resumed_with_auto(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, lr=0.03, epochs=1)
    finetune(cfg)
    with pytest.raises(ValueError, match=r"lr=0.03 \(now 'auto'\)"):
        finetune(replace(cfg, lr=AUTO), resume=True)


def test_a_diverging_candidate_is_out_and_all_diverging_is_an_error(tmp_path: Path) -> None:
    tuner = Finetuner(tiny(tmp_path, lr=0.05))
    search = tuner.search_rate(candidates=(0.05, 1e9), steps=4)
    assert [c["diverged"] for c in search["candidates"]] == [False, True] and search["chosen"] == 0.05
    with pytest.raises(ValueError, match="every candidate rate of lr auto .* diverged .* --lr"):
        tuner.search_rate(candidates=(1e9,), steps=4)


def test_the_cli_takes_auto_a_rate_or_a_recipe(capsys) -> None:
    import finetune as script

    def config(*argv: str) -> FinetuneConfig:
        return script.config_from_args(script.parse_args(["--init", "scratch", *argv]))

    assert config().lr == AUTO and (config().schedule, config().warmup_epochs, config().epochs) == ("cosine", 1.0, 10)
    assert config("--lr", "0.05").lr == 0.05 and config("--lr", "auto").lr == AUTO
    paper = config("--recipe", "paper")
    assert (paper.lr, paper.schedule, paper.warmup_epochs, paper.epochs) == (PAPER_LR, "constant", 7.0, 10)
    assert config("--recipe", "paper", "--epochs", "3").epochs == 3  # a flag overrides its recipe
    with pytest.raises(SystemExit):
        config("--lr", "fast")
    assert "'fast' is neither a number nor 'auto'" in capsys.readouterr().err


def test_two_processes_choose_the_same_rate_and_a_divergence_stops_both(tmp_path: Path) -> None:
    """Under torchrun (gloo, 2 ranks) every rank trains every candidate, rank 0 scores them and all adopt its choice; a
    candidate that diverges is abandoned by both ranks at the same step (no rank left waiting)."""
    from test_distributed import torchrun

    out, run_dir = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    torchrun(2, "finetune_auto", str(out), str(run_dir))
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["chosen"] == r1["chosen"] == 0.05 and r0["diverged"] == r1["diverged"] == [False, True]
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    assert _config(run_dir)["lr_search"]["chosen"] == 0.05
