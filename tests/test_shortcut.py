"""The modality shortcut, measured: split metrics, the shifted split, and the heated model's own figures."""

from __future__ import annotations

import json
from pathlib import Path

import finetune as finetune_script
import numpy as np
import pretrain
import pytest
from scipy.stats import chi2_contingency
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from classifiers.data import load_dataset
from classifiers.metrics import GROUP_NAMES, SHORTCUT_NAMES, classification_metrics, shortcut_metrics
from classifiers.synthrad import MODALITIES, preferred_modality

SHIFTED = "synthrad:shifted?n_train=96&n_val=24&n_test=1200"


def test_split_metrics_on_a_hand_made_case() -> None:
    """Six images shown in their class's preferred modality (five right), four in another one (one right)."""
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    pred = np.array([0, 1, 2, 0, 1, 0, 1, 0, 2, 1])
    in_preferred = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    m = shortcut_metrics(labels, pred, {"modality": in_preferred})
    assert set(m) == {*SHORTCUT_NAMES, "worst_group_accuracy"} and m["worst_group_accuracy"] == m["accuracy_other"]
    assert m["accuracy_preferred"] == pytest.approx(5 / 6)
    assert m["accuracy_other"] == pytest.approx(1 / 4)
    assert m["shortcut_gap"] == pytest.approx(5 / 6 - 1 / 4)
    probs = np.eye(3)[pred]
    full = classification_metrics(labels, probs, {"modality": in_preferred})
    assert {k: full[k] for k in m} == m and full["accuracy"] == pytest.approx(0.6)
    assert not set(GROUP_NAMES) & set(classification_metrics(labels, probs))
    empty = shortcut_metrics(labels, pred, {"modality": np.ones(10, bool)})
    assert np.isnan(empty["accuracy_other"]) and np.isnan(empty["shortcut_gap"])


def test_preferred_modality_is_the_generators() -> None:
    assert preferred_modality("pretrain", np.arange(12)).tolist() == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    assert set(preferred_modality("unseen", np.arange(6))) == set(range(len(MODALITIES)))


def test_shifted_split_draws_modality_independently_of_the_class() -> None:
    """synthrad:shifted trains and validates on the pretraining task's images and tests on 1,200 images whose
    modality is independent of the class: a third in the preferred modality, and no association between class and
    modality (chi-squared test). The ordinary test split keeps its bias of 0.6."""
    shifted = load_dataset(SHIFTED, image_size=16)
    plain = load_dataset(SHIFTED.replace(":shifted", ""), image_size=16)
    assert shifted.name == "synthrad:shifted" and shifted.class_names == plain.class_names
    for split in ("train", "val"):
        assert np.array_equal(shifted.splits[split].images.numpy(), plain.splits[split].images.numpy())
    test = shifted.splits["test"]
    assert np.array_equal(test.images.numpy(), plain.splits["shifted"].images.numpy())
    assert len(test) == 1200 and np.bincount(test.labels).tolist() == [100] * 12

    share = shifted.shortcut_agreement("test")["modality"].mean()
    assert abs(share - 1 / 3) < 0.045, share  # 3.3 standard deviations at n = 1200
    table = np.array([np.bincount(test.modality[test.labels == c], minlength=3) for c in range(12)])
    assert chi2_contingency(table).pvalue > 0.001, table
    assert plain.shortcut_agreement("test")["modality"].mean() == pytest.approx(0.6, abs=0.045)
    regions = test.regions.numpy()
    assert regions.shape == (1200, 16, 16) and set(np.unique(regions)) == {0, 1, 2}


def test_regions_mark_what_was_drawn() -> None:
    """The region map covers the drawn anatomy: background pixels of a CT image (linear in tissue, faint noise) are
    dark, anatomy pixels bright; lesion pixels exist exactly where a lesion was drawn (never in class *-none)."""
    data = load_dataset("synthrad?n_train=96&n_val=24&n_test=24", image_size=32)
    train = data.splits["train"]
    images, regions = train.images[:, 0].float().numpy(), train.regions.numpy()
    ct = train.modality == 0
    assert images[ct][regions[ct] == 0].mean() < 15 < images[ct][regions[ct] == 1].mean()
    no_lesion = np.array([data.class_names[c].endswith("-none") for c in train.labels])
    assert not (regions[no_lesion] == 2).any()
    assert all((regions[i] == 2).any() for i in np.flatnonzero(~no_lesion))


def test_finetuning_reports_the_shortcut_gap_on_synthrad(tmp_path: Path) -> None:
    run = tmp_path / "ft"
    argv = ["--init", "scratch", "--dataset", "synthrad:shifted?n_train=96&n_val=24&n_test=48", "--image-size", "16",
            "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--run-dir", str(run)]
    assert finetune_script.main(argv) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["split"] == "test" and m["dataset"] == "synthrad:shifted"
    assert m["shortcut_gap"] == pytest.approx(m["accuracy_preferred"] - m["accuracy_other"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/shortcut_gap" in r for r in rows) and any("test/shortcut_gap" in r for r in rows)


def test_finetuning_on_data_without_modalities_reports_no_gap(make_imagefolder, tmp_path: Path) -> None:
    root = make_imagefolder(classes=("a", "b"), per_class=4, size=(16, 16))
    run = tmp_path / "ft"
    argv = ["--init", "scratch", "--dataset", f"imagefolder:{root}", "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--run-dir", str(run)]
    assert finetune_script.main(argv) == 0
    assert not set(SHORTCUT_NAMES) & set(json.loads((run / "metrics.json").read_text()))


@pytest.mark.parametrize("algo", ["none", "uniform-mask", "reinforce"])
def test_pretraining_reports_the_heated_model_clean_and_perturbed(algo: str, tmp_path: Path) -> None:
    """At the end of a run: the heated model on the test and shifted splits, clean and perturbed as in training, in
    metrics.jsonl, heated_metrics.json and TensorBoard's table; validation passes report the gap; mask agents'
    diagnostics every logging step; the probe's picture at the first and the last step."""
    run = tmp_path / algo
    argv = ["--algo", algo, "--dataset", "synthrad?n_train=96&n_val=24&n_test=48", "--image-size", "32", "--grid", "8",
            "--blur-kernel", "5", "--blur-sigma", "2", "--batch-size", "16", "--max-steps", "5", "--device", "cpu",
            "--log-every", "2", "--image-every", "100", "--run-dir", str(run)]
    assert pretrain.main(argv) == 0
    figures = json.loads((run / "heated_metrics.json").read_text())
    assert figures["step"] == 5 and figures["algo"] == algo
    for split in ("test", "shifted", "test_perturbed", "shifted_perturbed"):
        for k in ("accuracy", "macro_f1", *SHORTCUT_NAMES):
            assert 0.0 <= figures[f"heated/{split}/{k}"] <= 1.0 or k == "shortcut_gap", (split, k)
    same = [figures[f"heated/test/{k}"] == figures[f"heated/test_perturbed/{k}"] for k in ("accuracy", "loss")]
    assert all(same) == (algo == "none")  # masks change what the model sees; plain training has nothing to add

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 5 and {k: v for k, v in last.items() if k.startswith("heated/")} == \
        {k: v for k, v in figures.items() if k.startswith("heated/")}
    assert any("val/shortcut_gap" in r for r in rows)
    logged = [r for r in rows if "train/loss" in r]
    assert all(("diagnostics/kl_uniform" in r) == (algo != "none") for r in logged)

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("heated/test/shortcut_gap")] == [5]  # the key figures, for HParams
    table = acc.Tensors("heated/table/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| shifted, perturbed |" in table and f"{figures['heated/shifted/shortcut_gap']:.3f}" in table
    if algo != "none":
        assert [e.step for e in acc.Images("images/probe_masks")] == [1, 5]
        assert "diagnostics/content_gap_image_specific" in acc.Tags()["scalars"]
    # rerunning the finished run writes the same figures again (the perturbed masks come from a seeded generator)
    assert pretrain.main(argv + ["--resume"]) == 0
    assert json.loads((run / "heated_metrics.json").read_text()) == figures
