"""The classifier's precision: ``auto`` resolution, bf16 autocast on a CPU, and the flag reaching every run."""

from __future__ import annotations

import json
from pathlib import Path

import pretrain
import pytest
import torch
from torch import nn

from agents.study import StudyConfig
from classifiers.finetune import FinetuneConfig
from classifiers.models import build_classifier
from classifiers.train import PRECISIONS, DevicePolicy, resolve_precision, supervised_step
from envs.core import EnvConfig

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

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert asked == [False]  # emulated bf16 is slower than fp32: it does not count


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


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_pretrain_flag_reaches_the_run(precision: str, synthrad_spec: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / precision
    argv = ["--algo", "reinforce", "--dataset", synthrad_spec, "--image-size", "32", "--grid", "8",
            "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "16", "--max-steps", "2", "--device", "cpu",
            "--precision", precision, "--run-dir", str(run_dir)]
    assert pretrain.main(argv) == 0
    assert f"pretrain reinforce ({precision})" in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text())["env"]["precision"] == precision


def test_study_passes_its_precision_to_every_run(tmp_path: Path) -> None:
    study = StudyConfig(precision="fp32", device="cpu")
    assert study.pretrain_config("reinforce", 0, tmp_path).env.precision == "fp32"
    assert study.finetune_config("scratch", "synthrad:unseen", 0).precision == "fp32"
