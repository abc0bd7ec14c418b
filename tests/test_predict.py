"""scripts/predict.py: predictions on new images as CSV, read exactly as evaluation reads them; unreadable images get a
row with the reason; --labels adds the true class and the paper's metrics; bad input gets one line and exit code 2."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import predict as predict_script
import pytest
import torch

from classifiers.cli import fail_cleanly
from classifiers.data import load_dataset, make_loader
from classifiers.finetune import FinetuneConfig, finetune
from classifiers.heated import load_heated, save_heated
from classifiers.inference import load_model_file
from classifiers.metrics import METRIC_NAMES
from classifiers.models import build_classifier
from classifiers.train import DevicePolicy, Normalizer, predict

CLASSES = ("cat", "dog", "eel")


def model_file(path: Path, channels: int = 1, size: int = 16, classes: tuple[str, ...] = CLASSES, **meta) -> Path:
    """A heated-model file of a freshly built smallcnn."""
    torch.manual_seed(0)
    model = build_classifier("smallcnn", len(classes), channels, size)
    save_heated(path, model, "smallcnn", len(classes), channels, size, list(classes), meta=meta)
    return path


@pytest.fixture
def heated(tmp_path: Path) -> Path:
    return model_file(tmp_path / "heated.pt")


def run(argv: list[str]) -> int:
    return fail_cleanly(lambda: predict_script.main([*argv, "--device", "cpu"]))


def refuse(argv: list[str], capsys: pytest.CaptureFixture[str], needle: str) -> None:
    code = run(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert needle in err, (needle, err)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_has_one_row_per_image_with_the_evaluation_probabilities(tmp_path, heated, make_imagefolder) -> None:
    root = make_imagefolder(classes=CLASSES, per_class=2, mode="RGB", size=(24, 20))
    out = tmp_path / "predictions.csv"
    assert run(["--model", str(heated), "--images", str(root / "val"), "--out", str(out), "--batch-size", "4"]) == 0
    rows = read_csv(out)
    assert len(rows) == 6
    assert list(rows[0]) == ["file", "predicted_class", "prob_cat", "prob_dog", "prob_eel", "error"]
    probs = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    assert probs.sum(1) == pytest.approx(np.ones(6), abs=1e-5)
    assert [r["predicted_class"] for r in rows] == [CLASSES[i] for i in probs.argmax(1)]
    assert all(r["error"] == "" for r in rows)
    # The same images through the evaluation path: dataset, loader, Normalizer, classifiers.train.predict
    model, _ = load_heated(heated)
    data = load_dataset(f"imagefolder:{root}", image_size=16, channels=1)
    expected, _, _ = predict(model, make_loader(data, "val", 4, train=False), DevicePolicy(torch.device("cpu"), "fp32"),
                             Normalizer())
    by_file = {Path(r["file"]): p for r, p in zip(rows, probs)}
    assert np.stack([by_file[f] for f in data.splits["val"].files]) == pytest.approx(expected, abs=1e-5)


def test_a_damaged_image_gets_a_row_with_its_reason(tmp_path, heated, make_imagefolder, capsys) -> None:
    folder = make_imagefolder(classes=CLASSES, per_class=1, splits=("new",)) / "new"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "p.csv"
    assert run(["--model", str(heated), "--images", str(folder), str(folder / "cat" / "img0.png"),
                "--out", str(out)]) == 0
    rows = {Path(r["file"]).name: r for r in read_csv(out)}
    assert len(read_csv(out)) == 6
    for name, reason in (("broken.png", "Truncated"), ("empty.jpg", "empty")):
        assert f"cannot read image {folder / name}" in rows[name]["error"], rows[name]["error"]
        assert reason in rows[name]["error"] and rows[name]["predicted_class"] == ""
        assert all(rows[name][f"prob_{c}"] == "" for c in CLASSES)
    assert rows["img0.png"]["error"] == "" and rows["img0.png"]["predicted_class"] in CLASSES
    assert "2 could not be read" in capsys.readouterr().out


def test_labels_add_the_true_class_and_print_the_metrics(tmp_path, heated, make_imagefolder, capsys) -> None:
    root = make_imagefolder(classes=("cat", "eel"), per_class=3, splits=("test",))
    (root / "test" / "dog").mkdir()  # a class without images is allowed
    (root / "test" / "eel" / "broken.png").write_bytes(b"")
    out = tmp_path / "p.csv"
    assert run(["--model", str(heated), "--images", str(root / "test"), "--labels", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0])[:3] == ["file", "true_class", "predicted_class"]
    assert [r["true_class"] for r in rows] == ["cat"] * 3 + ["eel"] * 4
    printed = capsys.readouterr().out
    assert "6 labelled images: " in printed
    for name in (*METRIC_NAMES, "ece"):
        assert f"{name} " in printed


def test_images_are_converted_to_the_models_channels_and_size(tmp_path, make_imagefolder) -> None:
    colour = model_file(tmp_path / "colour.pt", channels=3, size=32)
    folder = make_imagefolder(per_class=1, mode="L", size=(24, 20), splits=("new",)) / "new"
    out = tmp_path / "p.csv"
    assert run(["--model", str(colour), "--images", str(folder), "--out", str(out)]) == 0
    assert all(r["error"] == "" for r in read_csv(out))


def test_a_fine_tuned_model_reads_at_the_size_it_was_trained_on(tmp_path, make_imagefolder) -> None:
    assert load_model_file(model_file(tmp_path / "m.pt", size=16, image_size=24)).image_size == 24
    root = make_imagefolder(classes=CLASSES, per_class=4, splits=("train", "val", "test"))
    run_dir = finetune(FinetuneConfig(dataset=f"imagefolder:{root}", image_size=16, epochs=1, batch_size=4,
                                      device="cpu", run_dir=str(tmp_path / "ft")))
    loaded = load_model_file(run_dir / "model.pt")
    assert (loaded.class_names, loaded.in_channels, loaded.image_size) == (list(CLASSES), 1, 16)
    out = tmp_path / "p.csv"
    assert run(["--model", str(run_dir / "model.pt"), "--images", str(root / "test"), "--labels",
                "--out", str(out)]) == 0
    assert len(read_csv(out)) == 12


def _not_a_model(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("not a model")
    return tmp_path / "notes.txt"


def _other_torch_file(tmp_path: Path) -> Path:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    return tmp_path / "other.pt"


def _four_channels(tmp_path: Path) -> Path:
    return model_file(tmp_path / "four.pt", channels=4)


@pytest.mark.parametrize("make_model, needle", [
    (lambda tmp: tmp / "missing.pt", "does not exist"),
    (_not_a_model, "is not a model file"),
    (_other_torch_file, "is not a heated-model file"),
    (_four_channels, "takes 4-channel images"),
])
def test_a_bad_model_file_gets_one_line(tmp_path, make_imagefolder, capsys, make_model: Callable[[Path], Path],
                                        needle: str) -> None:
    folder = make_imagefolder(per_class=1, splits=("new",)) / "new"
    refuse(["--model", str(make_model(tmp_path)), "--images", str(folder), "--out", str(tmp_path / "p.csv")],
           capsys, needle)


def test_bad_images_and_options_get_one_line(tmp_path, heated, make_imagefolder, capsys) -> None:
    model = ["--model", str(heated), "--out", str(tmp_path / "p.csv")]
    root = make_imagefolder(classes=("cat", "fox"), per_class=1, splits=("new",))
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("no images here")
    refuse([*model, "--images", str(tmp_path / "nowhere")], capsys, "does not exist")
    refuse([*model, "--images", str(tmp_path / "empty")], capsys, "holds no images")
    refuse([*model, "--images", str(tmp_path / "texts")], capsys, "holds no images")
    refuse([*model, "--images", str(root / "new"), "--labels"], capsys, "class folders fox")
    refuse([*model, "--images", str(root / "new" / "cat"), "--labels"], capsys, "is not in a class folder")
    refuse([*model, "--images", str(tmp_path / "empty"), "--labels"], capsys, "has no class folders")
    refuse([*model, "--images", str(root / "new"), "--batch-size", "0"], capsys, "batch size 0")
    refuse(["--model", str(heated), "--images", str(root / "new"), "--out", str(tmp_path)], capsys, "is a folder")
    (tmp_path / "broken" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "cat" / "a.png").write_bytes(b"")
    assert run([*model, "--images", str(tmp_path / "broken"), "--labels"]) == 2  # after the progress bar: the CSV
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: none of the 1 images could be read")
