"""Classifiers, the heated-model file, and refusing files that would run code when loaded."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from classifiers.heated import FORMAT, load_heated, save_heated
from classifiers.io import UnsafeCheckpointError, load_tensors, save_tensors
from classifiers.models import ARCHITECTURES, build_classifier, replace_head


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_build_classifier_logits_shape(name: str, channels: int) -> None:
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=5, in_channels=channels, image_size=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 32, 32))
    assert tuple(out.shape) == (2, 5) and torch.isfinite(out).all()
    assert model.fc.out_features == 5


def test_small_image_stem_keeps_resolution() -> None:
    model = build_classifier("resnet18", 4, 1, image_size=32)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    big = build_classifier("resnet18", 4, 1, image_size=128)
    assert big.conv1.stride == (2, 2) and big.conv1.in_channels == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [(("vgg16", 4), "unknown classifier 'vgg16'"), (("smallcnn", 1), "at least 2 classes"),
     (("smallcnn", 4, 0), "in_channels")],
)
def test_build_classifier_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_classifier(*args)


def test_replace_head() -> None:
    model = build_classifier("smallcnn", 12, 1, 32)
    assert not replace_head(model, 12)
    assert replace_head(model, 6) and model.fc.out_features == 6


def test_heated_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_classifier("smallcnn", 12, 1, 32)
    model(torch.randn(4, 1, 32, 32))  # move the BatchNorm running statistics off their defaults
    path = tmp_path / "heated.pt"
    names = [f"c{i}" for i in range(12)]
    save_heated(path, model, "smallcnn", 12, 1, 32, class_names=names, meta={"epochs": 3})

    loaded, info = load_heated(path)
    ref = model.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert info["arch"] == "smallcnn" and info["num_classes"] == 12 and info["in_channels"] == 1
    assert info["image_size"] == 32 and info["class_names"] == names and info["meta"] == {"epochs": 3}
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))

    # Readable with plain torch.load under weights_only: nothing but tensors and plain values.
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == FORMAT and blob["arch"] == "smallcnn" and blob["num_classes"] == 12
    assert blob["in_channels"] == 1 and blob["image_size"] == 32
    assert all(torch.equal(ref[k], blob["state_dict"][k]) for k in ref)
    assert not list(tmp_path.glob(".heated.pt.*"))  # no temporary file left behind


def test_heated_round_trip_resnet_rgb(tmp_path: Path) -> None:
    model = build_classifier("resnet18", 3, 3, 32)
    save_heated(tmp_path / "h.pt", model, "resnet18", 3, 3, 32)
    loaded, info = load_heated(tmp_path / "h.pt")
    assert info["in_channels"] == 3 and loaded.conv1.in_channels == 3
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_heated_rejects_other_files(tmp_path: Path) -> None:
    save_tensors({"hello": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a heated-model file"):
        load_heated(tmp_path / "other.pt")
    model = build_classifier("smallcnn", 3, 1, 32)
    save_heated(tmp_path / "h.pt", model, "smallcnn", 3, 1, 32)
    blob = torch.load(tmp_path / "h.pt", weights_only=True)
    blob["num_classes"] = 5
    save_tensors(blob, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_heated(tmp_path / "wrong.pt")


def test_load_tensors_missing_and_damaged(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "none.pt")
    save_tensors({"w": torch.ones(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="half.pt"):
        load_tensors(tmp_path / "half.pt")


class _RunsCode:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_running_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "trap": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_tensors(path)
    with pytest.raises(UnsafeCheckpointError):
        load_heated(path)
    assert not marker.exists()


def test_device_policy_keeps_models_and_batches_channels_last_on_cpu() -> None:
    from classifiers.train import DevicePolicy

    dev = DevicePolicy(torch.device("cpu"))
    model = dev.prepare(build_classifier("smallcnn", 3, 1, 32))
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    images, labels = dev.batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    assert images.is_contiguous(memory_format=torch.channels_last) and images.dtype == torch.uint8
