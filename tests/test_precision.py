"""The classifier's precision: ``auto`` resolution, bf16 autocast on a CPU, and the flag reaching every run."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pretrain
import pytest
import torch
from torch import nn

from agents.runner import PretrainConfig
from agents.study import Study, StudyConfig
from classifiers.finetune import FinetuneConfig, Finetuner, finetune
from classifiers.models import build_classifier
from classifiers.train import PRECISIONS, DevicePolicy, Normalizer, predict, resolve_precision, supervised_step
from envs.core import EnvConfig, PretrainCore

CPU = torch.device("cpu")


@pytest.mark.parametrize("amx, expected", [(True, "bf16"), (False, "fp32"), (None, "fp32")])
def test_auto_on_a_cpu_is_bf16_only_with_amx(monkeypatch: pytest.MonkeyPatch, amx: bool | None, expected: str) -> None:
    if amx is None:  # a PyTorch without the probe
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_precision("auto", CPU) == expected
    assert DevicePolicy(CPU).precision == expected
    for name in ("bf16", "fp32"):  # an explicit choice is kept whatever the hardware
        assert resolve_precision(name, CPU) == name


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_a_gpu_is_bf16_only_where_it_is_native(monkeypatch: pytest.MonkeyPatch, native: bool,
                                                       expected: str) -> None:
    asked = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native

    entered = []

    class Selected:  # stands in for torch.cuda.device, which needs a GPU
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> None:
            entered.append(self.index)

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "device", Selected)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("auto", torch.device("cuda:1")) == expected
    assert asked == [False, False]  # emulated bf16 is slower than fp32: it does not count
    assert entered == [1]  # cuda:1 is asked about GPU 1, plain cuda about the current GPU


def test_unknown_precision_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp16'; use auto, bf16, fp32"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        EnvConfig(device="cpu", precision="fp16").validate()
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        FinetuneConfig(init="scratch", device="cpu", precision="half").validate()
    assert PRECISIONS == ("auto", "bf16", "fp32")


def _step(precision: str) -> tuple[torch.Tensor, nn.Module, set[torch.dtype]]:
    """One supervised step of a seeded smallcnn; the loss, the model and the dtypes its convolutions produced."""
    dev = DevicePolicy(CPU, precision)
    torch.manual_seed(0)
    model = dev.prepare(build_classifier("smallcnn", 4, 1, 16))
    dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (8,), generator=g)
    loss, logits = supervised_step(model, optimizer, x, labels, dev)
    assert loss.dtype == logits.dtype == torch.float32
    return loss, model, dtypes


def test_bf16_runs_the_classifier_in_bf16_and_keeps_float32_weights() -> None:
    loss16, model16, dtypes16 = _step("bf16")
    loss32, model32, dtypes32 = _step("fp32")
    assert dtypes16 == {torch.bfloat16} and dtypes32 == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    # the same step, rounded differently: close, not equal
    assert not torch.equal(loss16, loss32)
    torch.testing.assert_close(loss16, loss32, rtol=0.05, atol=0.05)
    torch.manual_seed(0)
    fresh = build_classifier("smallcnn", 4, 1, 16)
    moved = [not torch.equal(a, b) for a, b in zip(model16.parameters(), fresh.parameters())]
    assert any(moved)


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto"])
def test_pretrain_records_the_precision_it_ran_in(precision: str, synthrad_spec: str, tmp_path: Path,
                                                  capsys) -> None:
    run_dir = tmp_path / precision
    argv = ["--algo", "reinforce", "--dataset", synthrad_spec, "--image-size", "32", "--grid", "8",
            "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "16", "--max-steps", "2", "--device", "cpu",
            "--precision", precision, "--run-dir", str(run_dir)]
    assert pretrain.main(argv) == 0
    resolved = resolve_precision(precision, CPU)
    assert f"pretrain reinforce ({resolved})" in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text())["env"]["precision"] == resolved  # what ran, not "auto"
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["config"]["env"]["precision"]
    assert saved == resolved  # so a resume keeps it, on any machine


def _finetune_config(run_dir: Path, precision: str) -> FinetuneConfig:
    return FinetuneConfig(init="scratch", dataset="synthrad:unseen?n_train=48&n_val=12&n_test=12", image_size=16,
                          epochs=1, batch_size=16, device="cpu", precision=precision, run_dir=str(run_dir))


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_finetune_records_its_precision_and_refuses_to_resume_in_another(precision: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "ft"
    cfg = _finetune_config(run_dir, precision)
    finetune(cfg)
    resolved = resolve_precision(precision, CPU)
    assert json.loads((run_dir / "config.json").read_text())["precision"] == resolved
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["config"]["precision"] == resolved
    other = {"bf16": "fp32", "fp32": "bf16"}[resolved]
    with pytest.raises(ValueError, match=f"precision='{resolved}'"):
        finetune(replace(cfg, precision=other), resume=True)


@pytest.mark.parametrize("amx_later", [True, False])
def test_finetune_resumed_with_auto_keeps_its_precision_on_another_machine(amx_later: bool, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "ft"
    ran_in = "fp32" if amx_later else "bf16"  # the run started where auto gave the other one
    finetune(_finetune_config(run_dir, ran_in))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx_later, raising=False)
    assert resolve_precision("auto", CPU) != ran_in
    resumed = Finetuner(_finetune_config(run_dir, "auto"), resume=True)
    assert resumed.cfg.precision == resumed.dev.precision == ran_in


def test_ranks_that_resolve_different_precisions_are_refused_by_runs(tmp_path: Path, synthrad_spec: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import classifiers.distributed as distributed

    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: [value, "fp16"])
    with pytest.raises(ValueError, match="rank 1: fp16"):
        PretrainCore(EnvConfig(dataset=synthrad_spec, image_size=32, grid=8, blur_kernel=5, batch_size=8,
                               device="cpu", precision="fp32"))
    with pytest.raises(ValueError, match="rank 1: fp16"):
        Finetuner(_finetune_config(tmp_path / "ft", "fp32"))


def test_runs_saved_before_the_setting_resume_in_their_old_arithmetic() -> None:
    """Before ``precision`` existed, the classifier trained in bf16 on CUDA and in fp32 on a CPU."""
    env = asdict(EnvConfig(device="cpu"))
    del env["precision"]
    old = {"algo": "reinforce", "env": env}
    assert PretrainConfig.from_dict(old).env.precision == "fp32"
    assert PretrainConfig.from_dict(old | {"env": env | {"device": "cuda"}}).env.precision == "bf16"
    assert FinetuneConfig.from_dict({"init": "scratch", "device": "cpu"}).precision == "fp32"
    assert FinetuneConfig.from_dict({"init": "scratch", "device": "cpu", "precision": "bf16"}).precision == "bf16"


def test_study_resolves_auto_once_and_keys_runs_by_precision(tmp_path: Path) -> None:
    def study(precision: str) -> Study:
        return Study(StudyConfig(precision=precision, device="cpu", out=str(tmp_path)))

    assert study("auto").cfg.precision == resolve_precision("auto", CPU)
    fp32, bf16 = study("fp32"), study("bf16")
    assert fp32.cfg.pretrain_config("reinforce", 0, tmp_path).env.precision == "fp32"
    assert fp32.cfg.finetune_config("scratch", "synthrad:unseen", 0).precision == "fp32"
    # runs in another arithmetic are never reused
    assert fp32.pretrain_dir("none", 0) != bf16.pretrain_dir("none", 0)
    assert fp32.finetune_run("scratch", 0, "synthrad:unseen").run_dir != \
        bf16.finetune_run("scratch", 0, "synthrad:unseen").run_dir


def test_evaluation_is_float32_whatever_the_training_precision() -> None:
    dev = DevicePolicy(CPU, "bf16")
    model = dev.prepare(build_classifier("smallcnn", 3, 1, 16))
    dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    loader = [(torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))]
    probs, labels, _ = predict(model, loader, dev, Normalizer())
    assert dtypes == {torch.float32} and probs.dtype == np.float32 and probs.shape == (4, 3)


def test_ranks_that_resolve_different_precisions_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import classifiers.distributed as distributed

    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: [value, "fp32"])
    distributed.require_same("fp32", "precisions", "give --precision")  # agreeing ranks pass
    with pytest.raises(ValueError, match=r"rank 0: bf16, rank 1: fp32\); give --precision bf16 or fp32"):
        distributed.require_same("bf16", "precisions", "give --precision bf16 or fp32")
