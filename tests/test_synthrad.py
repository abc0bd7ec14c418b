"""The embedded synthrad generator: determinism, classes, modality styles, sizes and its cache."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from classifiers import synthrad
from classifiers.data import load_dataset
from classifiers.synthrad import MODALITIES, TASKS, SynthRadConfig, class_names, load_synthrad

SMALL = {"image_size": 32, "n_train": 96, "n_val": 24, "n_test": 24}


def _cfg(**kw) -> SynthRadConfig:
    return SynthRadConfig(**{**SMALL, **kw})


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_same_seed_gives_identical_arrays(tmp_path: Path) -> None:
    a = load_synthrad(_cfg(seed=3), cache_dir=tmp_path / "a")
    b = load_synthrad(_cfg(seed=3), cache_dir=tmp_path / "b")  # generated afresh, not read from a's cache
    _assert_same(a, b)
    for split in ("train", "val", "test"):
        assert a[f"{split}_images"].dtype == np.uint8
        assert a[f"{split}_labels"].dtype == np.int64


def test_different_seed_gives_different_arrays(tmp_path: Path) -> None:
    a = load_synthrad(_cfg(seed=0), cache_dir=tmp_path)
    b = load_synthrad(_cfg(seed=1), cache_dir=tmp_path)
    assert not np.array_equal(a["train_images"], b["train_images"])
    assert not np.array_equal(a["train_labels"], b["train_labels"])


def test_splits_differ(tmp_path: Path) -> None:
    a = load_synthrad(_cfg(n_train=24, n_val=24, n_test=24), cache_dir=tmp_path)
    assert not np.array_equal(a["train_images"], a["val_images"])
    assert not np.array_equal(a["val_images"], a["test_images"])


def test_pretrain_has_12_classes_all_present(tmp_path: Path) -> None:
    names = class_names("pretrain")
    assert len(names) == 12 and len(set(names)) == 12
    a = load_synthrad(_cfg(), cache_dir=tmp_path)
    for split in ("train", "val", "test"):
        labels = a[f"{split}_labels"]
        assert labels.min() == 0 and labels.max() == 11
    # Balanced training classes.
    assert np.bincount(a["train_labels"], minlength=12).tolist() == [96 // 12] * 12


def test_dataset_spec_names_the_classes(synthrad_spec: str) -> None:
    data = load_dataset(synthrad_spec, image_size=32)
    assert data.num_classes == 12 and data.class_names == class_names("pretrain")
    unseen = load_dataset("synthrad:unseen?n_train=60&n_val=12&n_test=12", image_size=32)
    assert unseen.class_names == class_names("unseen")
    assert sorted(np.unique(unseen.splits["train"].labels).tolist()) == list(range(unseen.num_classes))


def test_unseen_concepts_are_disjoint_from_pretraining() -> None:
    pre, new = TASKS["pretrain"], TASKS["unseen"]
    assert not set(pre["anatomies"]) & set(new["anatomies"])
    assert not set(pre["lesions"]) & set(new["lesions"])
    pre_parts = {p for name in class_names("pretrain") for p in name.split("-")}
    for name in class_names("unseen"):
        assert not set(name.split("-")) & pre_parts, name
    assert not set(class_names("pretrain")) & set(class_names("unseen"))


def _modality_stats(images: np.ndarray, modality: np.ndarray) -> dict[str, dict[str, float]]:
    x = images.astype(np.float64) / 255.0
    out = {}
    for i, name in enumerate(MODALITIES):
        sel = x[modality == i]
        assert len(sel) > 10, f"too few {name} images to compare"
        out[name] = {
            "mean": float(sel.mean()),
            "zero": float((sel == 0).mean()),
            "grad": float(np.abs(np.diff(sel, axis=-1)).mean()),
        }
    return out


def test_modalities_have_different_low_level_statistics(tmp_path: Path) -> None:
    a = load_synthrad(_cfg(n_train=240), cache_dir=tmp_path)
    s = _modality_stats(a["train_images"], a["train_modality"])
    # MR: Rician noise leaves almost no exact zeros, a bright soft-tissue contrast and a noisy texture.
    assert s["mr"]["zero"] < 0.02
    assert s["mr"]["mean"] > s["ct"]["mean"] + 0.05 and s["mr"]["mean"] > s["us"]["mean"] + 0.05
    assert s["mr"]["grad"] > 1.4 * max(s["ct"]["grad"], s["us"]["grad"])
    # Ultrasound: black outside the fan-shaped field of view, far more zeros than CT's windowed air.
    assert s["us"]["zero"] > s["ct"]["zero"] + 0.1
    assert s["ct"]["zero"] > s["mr"]["zero"] + 0.1


def _preferred_share(labels: np.ndarray, modality: np.ndarray, k: int) -> float:
    """Mean over classes of the share of the class's most common modality."""
    shares = []
    for c in range(k):
        counts = np.bincount(modality[labels == c], minlength=len(MODALITIES))
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_modality_bias_in_pretrain_not_in_unseen(tmp_path: Path) -> None:
    n = {"image_size": 8, "n_train": 1200, "n_val": 12, "n_test": 12}
    pre = load_synthrad(SynthRadConfig(task="pretrain", **n), cache_dir=tmp_path)
    new = load_synthrad(SynthRadConfig(task="unseen", **n), cache_dir=tmp_path)
    pre_share = _preferred_share(pre["train_labels"], pre["train_modality"], 12)
    new_share = _preferred_share(new["train_labels"], new["train_modality"], 6)
    assert 0.5 < pre_share < 0.75  # default bias 0.6: a tempting but partial shortcut
    assert new_share < 0.45  # modality independent of the class (chance is 1/3)
    # Every modality still appears in every pretraining class: the label is not the modality.
    for c in range(12):
        assert set(np.unique(pre["train_modality"][pre["train_labels"] == c])) == {0, 1, 2}


def test_modality_bias_option(tmp_path: Path) -> None:
    full = load_synthrad(_cfg(image_size=8, modality_bias=1.0), cache_dir=tmp_path)
    assert _preferred_share(full["train_labels"], full["train_modality"], 12) == 1.0
    data = load_dataset("synthrad?n_train=96&n_val=12&n_test=12&modality_bias=1.0", image_size=8)
    assert data.num_classes == 12


@pytest.mark.parametrize("size", [16, 48])
def test_image_size_is_configurable(tmp_path: Path, size: int) -> None:
    a = load_synthrad(_cfg(image_size=size, n_train=24, n_val=12, n_test=12), cache_dir=tmp_path)
    assert a["train_images"].shape == (24, 1, size, size)
    assert a["val_images"].shape == (12, 1, size, size)
    data = load_dataset("synthrad?n_train=24&n_val=12&n_test=12", image_size=size)
    assert data.image_size == size and data.in_channels == 1
    assert tuple(data.splits["train"].images.shape) == (24, 1, size, size)


def test_default_size_is_64() -> None:
    assert SynthRadConfig().image_size == 64
    assert load_dataset("synthrad?n_train=12&n_val=12&n_test=12").image_size == 64


def test_invalid_config_raises() -> None:
    with pytest.raises(ValueError, match="unknown synthrad task"):
        SynthRadConfig(task="nope").validate()
    with pytest.raises(ValueError, match="too small"):
        SynthRadConfig(image_size=4).validate()
    with pytest.raises(ValueError, match="n_train"):
        SynthRadConfig(n_train=0).validate()
    with pytest.raises(ValueError, match="modality_bias"):
        SynthRadConfig(modality_bias=1.5).validate()


def _fail(*args, **kwargs):
    raise AssertionError("generate_split was called: the cache was not reused")


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_synthrad(_cfg(), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("synthrad-*.npz"))) == 1
    monkeypatch.setattr(synthrad, "generate_split", _fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = load_synthrad(_cfg(), cache_dir=tmp_path)
    _assert_same(first, second)


def test_cache_key_covers_parameters(tmp_path: Path) -> None:
    load_synthrad(_cfg(seed=0), cache_dir=tmp_path)
    load_synthrad(_cfg(seed=1), cache_dir=tmp_path)
    load_synthrad(_cfg(seed=0, modality_bias=0.9), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("synthrad-*.npz"))) == 3


def test_default_cache_dir_follows_env(isolated_cache: Path) -> None:
    assert synthrad.default_cache_dir() == isolated_cache
    load_synthrad(_cfg(n_train=12, n_val=12, n_test=12, seed=77))
    assert list(isolated_cache.glob("synthrad-*.npz"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(255 - b for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an npz file")


@pytest.mark.parametrize("damage", [_truncate, _overwrite_middle, _garbage])
def test_damaged_cache_is_rebuilt(tmp_path: Path, damage) -> None:
    first = load_synthrad(_cfg(), cache_dir=tmp_path)
    (path,) = tmp_path.glob("synthrad-*.npz")
    damage(path)
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = load_synthrad(_cfg(), cache_dir=tmp_path)
    _assert_same(first, rebuilt)
    # The rebuilt file is intact again: read back silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(first, load_synthrad(_cfg(), cache_dir=tmp_path))


def test_tampered_arrays_fail_the_checksum(tmp_path: Path) -> None:
    first = load_synthrad(_cfg(), cache_dir=tmp_path)
    (path,) = tmp_path.glob("synthrad-*.npz")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["train_images"] = arrays["train_images"].copy()
    arrays["train_images"][0, 0, 0, 0] ^= 1
    np.savez(path, **arrays)  # a well-formed file whose stored checksum no longer matches
    with pytest.warns(UserWarning, match="checksum mismatch"):
        rebuilt = load_synthrad(_cfg(), cache_dir=tmp_path)
    _assert_same(first, rebuilt)
