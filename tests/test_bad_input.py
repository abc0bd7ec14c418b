"""Bad input is refused before training starts: one line naming the value and the fix, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pretrain as pretrain_script
import pytest
from PIL import Image

from classifiers.cli import fail_cleanly

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--image-size", "32", "--grid", "8", "--batch-size", "4", "--max-steps", "2", "--device", "cpu"]


def refuse(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    code = fail_cleanly(lambda: pretrain_script.main(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def imagefolder(root: Path, classes: dict[str, int], corrupt: str | None = None) -> Path:
    for split in ("train", "val"):
        for name, n in classes.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / corrupt).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def run_dir(tmp_path: Path) -> list[str]:
    return ["--run-dir", str(tmp_path / "run")]


def test_missing_dataset_path(tmp_path, capsys):
    refuse(["--dataset", f"imagefolder:{tmp_path / 'nope'}", *TINY, *run_dir(tmp_path)], capsys, "does not exist")
    refuse(["--dataset", f"medmnist:{tmp_path / 'nope.npz'}", *TINY, *run_dir(tmp_path)], capsys, "nope.npz")


def test_empty_class_folder(tmp_path, capsys):
    root = imagefolder(tmp_path / "data", {"a": 3, "b": 3})
    (root / "train" / "c").mkdir()
    refuse(["--dataset", f"imagefolder:{root}", *TINY, *run_dir(tmp_path)], capsys, "holds no images", "train/c")


def test_no_class_folders(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    refuse(["--dataset", f"imagefolder:{tmp_path / 'data'}", *TINY, *run_dir(tmp_path)], capsys, "no class folders")


def test_corrupt_image_is_named(tmp_path, capsys):
    root = imagefolder(tmp_path / "data", {"a": 3, "b": 3}, corrupt="a/broken.png")
    refuse(["--dataset", f"imagefolder:{root}", *TINY, *run_dir(tmp_path)], capsys, "broken.png")


def test_truncated_npz(tmp_path, capsys):
    path = tmp_path / "m.npz"
    np.savez(path, train_images=np.zeros((8, 12, 12), np.uint8), train_labels=np.zeros((8, 1), np.int64),
             val_images=np.zeros((4, 12, 12), np.uint8), val_labels=np.zeros((4, 1), np.int64))
    path.write_bytes(path.read_bytes()[:300])
    refuse(["--dataset", f"medmnist:{path}", *TINY, *run_dir(tmp_path)], capsys, "m.npz", "not a readable")


def test_labels_out_of_range(tmp_path, capsys):
    path = tmp_path / "m.npz"
    np.savez(path, train_images=np.zeros((8, 12, 12), np.uint8), train_labels=np.array([0, 1] * 4),
             val_images=np.zeros((4, 12, 12), np.uint8), val_labels=np.array([0, 1, 2, 5]))
    refuse(["--dataset", f"medmnist:{path}", *TINY, *run_dir(tmp_path)], capsys, "label 5", "out of range")


@pytest.mark.parametrize("flags, needles", [
    (["--grid", "64"], ["grid 64"]),
    (["--blur-kernel", "4"], ["blur kernel 4", "odd"]),
    (["--blur-kernel", "81"], ["blur kernel 81", "too large"]),
    (["--lr", "0"], ["learning rate 0"]),
    (["--lr", "-0.1"], ["learning rate -0.1"]),
    (["--policy-lr", "-1"], ["policy learning rate -1"]),
    (["--batch-size", "0"], ["batch size 0"]),
    (["--algo", "dqn"], ["unknown algo 'dqn'", "reinforce"]),
    (["--classifier", "vgg"], ["unknown classifier 'vgg'", "resnet18"]),
    (["--epochs", "0"], ["epochs 0"]),
    (["--device", "tpu"], ["unknown device 'tpu'"]),
])
def test_bad_settings(tmp_path, capsys, flags, needles):
    refuse([*TINY, *flags, *run_dir(tmp_path)], capsys, *needles)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unwritable_run_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    refuse([*TINY, "--run-dir", str(blocker / "run")], capsys, "cannot be written", "--run-dir")


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"precious")
    refuse([*TINY, *run_dir(tmp_path)], capsys, "already holds a run", "--resume")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"precious"


def test_real_process_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), *TINY, "--grid", "64",
                           *run_dir(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "grid 64" in proc.stderr
