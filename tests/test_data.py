"""Loaders: uint8 batches, deterministic augmentation, sharding, few-shot subsets, on-disk formats, bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from classifiers.data import DataError, EpochSampler, ImageDataset, load_dataset, make_loader

SIZE = 32


@pytest.fixture(scope="module")
def synth(synthrad_spec: str):
    return load_dataset(synthrad_spec, image_size=SIZE)


def _batches(loader, epoch: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    out = []
    for i, batch in enumerate(loader):
        if i == n:
            break
        out.append(batch)
    return out


# --- loaders -------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_loader_yields_uint8_bchw_and_int64_labels(synth, train: bool) -> None:
    loader = make_loader(synth, "train" if train else "val", batch_size=8, train=train, seed=0)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (8, 1, SIZE, SIZE)
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (8,)
    assert int(labels.min()) >= 0 and int(labels.max()) < synth.num_classes


def test_train_loader_drops_last_eval_loader_keeps_all(synth) -> None:
    train = make_loader(synth, "train", batch_size=7, train=True)
    assert len(train) == 240 // 7 and all(len(y) == 7 for _, y in train)
    val = make_loader(synth, "val", batch_size=7, train=False)
    labels = torch.cat([y for _, y in val])
    np.testing.assert_array_equal(labels.numpy(), synth.splits["val"].labels)  # every image, in order


def test_eval_loader_gives_the_images_unchanged(synth) -> None:
    loader = make_loader(synth, "test", batch_size=16, train=False)
    images = torch.cat([x for x, _ in loader])
    assert torch.equal(images, synth.splits["test"].images)


def test_augmentation_is_deterministic_per_seed_and_epoch(synth) -> None:
    a = _batches(make_loader(synth, "train", batch_size=8, train=True, seed=5), epoch=2)
    b = _batches(make_loader(synth, "train", batch_size=8, train=True, seed=5), epoch=2)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = _batches(make_loader(synth, "train", batch_size=8, train=True, seed=6), epoch=2)
    assert not torch.equal(a[0][0], c[0][0])


def test_augmentation_differs_between_epochs_for_the_same_image(synth) -> None:
    source = synth.splits["train"]
    ds = ImageDataset(source, SIZE, 1, train=True)
    sampler = EpochSampler(len(source), seed=0)
    per_epoch = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seeds = dict(iter(sampler))
        per_epoch.append({i: ds[(i, seeds[i])][0] for i in range(16)})
    changed = sum(not torch.equal(per_epoch[0][i], per_epoch[1][i]) for i in range(16))
    assert changed >= 14
    # Augmented images differ from the stored ones but keep their shape and dtype.
    img = per_epoch[0][0]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (1, SIZE, SIZE)
    assert sum(not torch.equal(per_epoch[0][i], source.images[i]) for i in range(16)) >= 14
    # Without an augmentation seed (evaluation) the image is returned as stored.
    assert torch.equal(ds[3][0], source.images[3])


def test_epoch_order_is_a_permutation_that_changes_with_epoch() -> None:
    s = EpochSampler(50, seed=1)
    s.set_epoch(0)
    e0 = [i for i, _ in s]
    s.set_epoch(1)
    e1 = [i for i, _ in s]
    assert sorted(e0) == sorted(e1) == list(range(50))
    assert e0 != e1
    assert [i for i, _ in EpochSampler(50, seed=1, shuffle=False)] == list(range(50))


@pytest.mark.parametrize("n", [20, 21])
def test_sampler_sharding_covers_the_permutation(n: int) -> None:
    full = EpochSampler(n, seed=3)
    full.set_epoch(4)
    whole = list(full)
    shards = []
    for rank in range(2):
        s = EpochSampler(n, seed=3, rank=rank, num_replicas=2)
        s.set_epoch(4)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == -(-n // 2)
    assert set(i for shard in shards for i, _ in shard) == set(range(n))
    # Interleaving the ranks gives the single-process order (padded by wrap-around).
    interleaved = [p for pair in zip(*shards) for p in pair]
    assert interleaved[:n] == whole
    # Each sample's augmentation seed does not depend on the rank.
    seeds = dict(whole)
    assert all(seeds[i] == s for shard in shards for i, s in shard)


def test_set_epoch_start_skips_samples() -> None:
    s = EpochSampler(30, seed=2, rank=1, num_replicas=2)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=4)
    assert list(s) == full[4:] and len(s) == len(full) - 4


def test_loader_shards_split_the_batch(synth) -> None:
    single = _batches(make_loader(synth, "train", batch_size=8, train=True, seed=1), epoch=0, n=2)
    ranks = [_batches(make_loader(synth, "train", batch_size=4, train=True, seed=1, rank=r, num_replicas=2),
                      epoch=0, n=2) for r in range(2)]
    for step in range(2):
        labels = torch.stack([ranks[0][step][1], ranks[1][step][1]], 1).flatten()
        assert torch.equal(labels, single[step][1])


def test_loader_errors(synth) -> None:
    with pytest.raises(DataError, match="batch size"):
        make_loader(synth, "train", batch_size=0, train=True)
    with pytest.raises(DataError, match="no 'nope' split"):
        make_loader(synth, "nope", batch_size=4, train=False)
    with pytest.raises(DataError, match="fewer than one batch"):
        make_loader(synth, "train", batch_size=1000, train=True)


# --- few-shot and channels -----------------------------------------------------------------------

def test_few_shot_caps_each_class(synthrad_spec: str, synth) -> None:
    data = load_dataset(synthrad_spec, image_size=SIZE, train_per_class=3, seed=0)
    labels = data.splits["train"].labels
    assert np.bincount(labels, minlength=12).tolist() == [3] * 12
    assert len(data.splits["val"]) == len(synth.splits["val"])  # only training is capped
    # The kept images are images of the full set, with their own labels.
    full = synth.splits["train"]
    for img, y in zip(data.splits["train"].images[:6], labels[:6]):
        match = [j for j in range(len(full)) if torch.equal(full.images[j], img)]
        assert match and full.labels[match[0]] == y
    same = load_dataset(synthrad_spec, image_size=SIZE, train_per_class=3, seed=0)
    other = load_dataset(synthrad_spec, image_size=SIZE, train_per_class=3, seed=1)
    assert torch.equal(same.splits["train"].images, data.splits["train"].images)
    assert not torch.equal(other.splits["train"].images, data.splits["train"].images)
    with pytest.raises(DataError, match="train_per_class"):
        load_dataset(synthrad_spec, image_size=SIZE, train_per_class=0)


def test_channels_3_on_grayscale(synthrad_spec: str, synth) -> None:
    data = load_dataset(synthrad_spec, image_size=SIZE, channels=3)
    assert data.in_channels == 3
    imgs = data.splits["train"].images
    assert tuple(imgs.shape) == (240, 3, SIZE, SIZE) and imgs.dtype == torch.uint8
    assert torch.equal(imgs[:, 0], imgs[:, 1]) and torch.equal(imgs[:, 0], imgs[:, 2])
    assert torch.equal(imgs[:, :1], synth.splits["train"].images)
    x, _ = next(iter(make_loader(data, "train", batch_size=4, train=True)))
    assert tuple(x.shape) == (4, 3, SIZE, SIZE)


# --- imagefolder ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "fmt", "channels"), [("L", "PNG", 1), ("RGB", "JPEG", 3), ("RGB", "PNG", 3)])
def test_imagefolder(make_imagefolder, mode: str, fmt: str, channels: int) -> None:
    root = make_imagefolder(mode=mode, fmt=fmt, splits=("train", "val", "test"))
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    assert data.class_names == ["cat", "dog", "eel"] and data.in_channels == channels
    assert sorted(data.splits) == ["test", "train", "val"] and data.eval_split == "test"
    assert data.splits["train"].labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for split, train in (("train", True), ("val", False), ("test", False)):
        x, y = next(iter(make_loader(data, split, batch_size=4, train=train)))
        assert x.dtype == torch.uint8 and tuple(x.shape) == (4, channels, 16, 16)
        assert y.dtype == torch.int64


def test_imagefolder_without_test_split_and_native_size(make_imagefolder) -> None:
    root = make_imagefolder(size=(24, 20))
    data = load_dataset(f"imagefolder:{root}")
    assert data.eval_split == "val" and "test" not in data.splits
    assert data.image_size == 20  # the shorter side of the first image
    x, _ = next(iter(make_loader(data, "val", batch_size=2, train=False)))
    assert tuple(x.shape) == (2, 1, 20, 20)


def test_imagefolder_channel_conversion(make_imagefolder) -> None:
    gray = make_imagefolder(mode="L")
    x, _ = next(iter(make_loader(load_dataset(f"imagefolder:{gray}", image_size=16, channels=3), "val", 2, False)))
    assert tuple(x.shape) == (2, 3, 16, 16) and torch.equal(x[:, 0], x[:, 2])
    rgb = make_imagefolder(mode="RGB")
    data = load_dataset(f"imagefolder:{rgb}", image_size=16, channels=1)
    x, _ = next(iter(make_loader(data, "train", 2, True)))
    assert data.in_channels == 1 and tuple(x.shape) == (2, 1, 16, 16)


def test_imagefolder_mixed_grayscale_and_colour(make_imagefolder) -> None:
    from PIL import Image

    root = make_imagefolder(mode="L")
    Image.new("RGB", (24, 20), (200, 10, 10)).save(root / "train" / "dog" / "colour.png")
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    assert data.in_channels == 1
    xs = torch.cat([x for x, _ in make_loader(data, "train", 13, False)])
    assert tuple(xs.shape) == (13, 1, 16, 16)


# --- medmnist ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rgb", [False, True])
def test_medmnist(make_medmnist, rgb: bool) -> None:
    path = make_medmnist(rgb=rgb)
    data = load_dataset(f"medmnist:{path}")
    c = 3 if rgb else 1
    assert data.in_channels == c and data.image_size == 28 and data.num_classes == 3
    raw = np.load(path)["val_images"]
    expected = torch.from_numpy(raw).unsqueeze(1) if not rgb else torch.from_numpy(raw).permute(0, 3, 1, 2)
    assert torch.equal(data.splits["val"].images, expected)
    x, y = next(iter(make_loader(data, "train", batch_size=4, train=True)))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (4, c, 28, 28) and y.dtype == torch.int64
    resized = load_dataset(f"medmnist:{path}", image_size=SIZE)
    x, _ = next(iter(make_loader(resized, "test", batch_size=4, train=False)))
    assert tuple(x.shape) == (4, c, SIZE, SIZE)


def test_medmnist_without_test_split(make_medmnist) -> None:
    data = load_dataset(f"medmnist:{make_medmnist(n={'train': 9, 'val': 3})}")
    assert sorted(data.splits) == ["train", "val"] and data.eval_split == "val"


# --- bad data ------------------------------------------------------------------------------------

def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as exc:
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    assert "nowhere" in str(exc.value)
    with pytest.raises(DataError, match="does not exist") as exc:
        load_dataset(f"medmnist:{tmp_path / 'missing.npz'}")
    assert "missing.npz" in str(exc.value)
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="val is missing"):
        load_dataset(f"imagefolder:{tmp_path / 'only_train'}")


def test_no_class_folders(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_class_folder_without_images(make_imagefolder) -> None:
    root = make_imagefolder()
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="holds no images") as exc:
        load_dataset(f"imagefolder:{root}")
    assert "zebra" in str(exc.value)


def test_val_class_unknown_to_train(make_imagefolder) -> None:
    root = make_imagefolder()
    (root / "val" / "yak").mkdir()
    with pytest.raises(DataError, match="no counterpart") as exc:
        load_dataset(f"imagefolder:{root}")
    assert "yak" in str(exc.value)


@pytest.mark.parametrize("where", [("train", "cat", "aaa_broken.png"), ("val", "eel", "zzz_broken.jpg")])
def test_unreadable_image_names_the_file(make_imagefolder, where: tuple[str, str, str]) -> None:
    root = make_imagefolder()
    split, cls, name = where
    (root / split / cls / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    with pytest.raises(DataError, match="cannot read image") as exc:
        load_dataset(f"imagefolder:{root}")
    assert name in str(exc.value)


def test_npz_not_readable(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable .npz") as exc:
        load_dataset(f"medmnist:{path}")
    assert "broken.npz" in str(exc.value)


def test_npz_without_expected_keys(make_medmnist) -> None:
    path = make_medmnist(overrides={"val_labels": None, "val_images": None})
    with pytest.raises(DataError, match="lacks the arrays") as exc:
        load_dataset(f"medmnist:{path}")
    assert "val_images" in str(exc.value) and "val_labels" in str(exc.value)
    other = make_medmnist(overrides={"train_images": None, "train_labels": None, "images": np.zeros((2, 4, 4))})
    with pytest.raises(DataError, match="train_images"):
        load_dataset(f"medmnist:{other}")


def test_negative_label(make_medmnist) -> None:
    labels = (np.arange(12) % 3).astype(np.int64).reshape(-1, 1)
    labels[5] = -1
    with pytest.raises(DataError, match="label -1 is out of range"):
        load_dataset(f"medmnist:{make_medmnist(overrides={'train_labels': labels})}")


def test_val_label_beyond_class_count(make_medmnist) -> None:
    val = np.array([[0], [1], [2], [5], [0], [1]], dtype=np.uint8)
    with pytest.raises(DataError, match=r"label 5 is out of range for 3 classes") as exc:
        load_dataset(f"medmnist:{make_medmnist(overrides={'val_labels': val})}")
    assert "val_labels" in str(exc.value)


def test_bad_image_arrays(make_medmnist) -> None:
    floats = np.zeros((6, 28, 28), dtype=np.float32)
    with pytest.raises(DataError, match="uint8"):
        load_dataset(f"medmnist:{make_medmnist(overrides={'val_images': floats})}")
    short = np.zeros((5, 28, 28), dtype=np.uint8)
    with pytest.raises(DataError, match="must match"):
        load_dataset(f"medmnist:{make_medmnist(overrides={'val_images': short})}")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("cifar10", "unknown dataset"),
        ("", "empty"),
        ("synthrad:nope", "unknown synthrad task"),
        ("synthrad?colour=1", "unknown option 'colour'"),
        ("synthrad?n_train=many", "not a number"),
    ],
)
def test_unknown_dataset_spec(spec: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_dataset(spec)


def test_image_size_too_small(synthrad_spec: str) -> None:
    with pytest.raises(DataError, match="too small"):
        load_dataset(synthrad_spec, image_size=4)


def test_16_bit_images_are_stretched_not_clipped(tmp_path):
    from PIL import Image

    from classifiers.data import _read_image

    ramp = np.linspace(0, 60000, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ct.png")
    img = _read_image(tmp_path / "ct.png", None)
    assert img.shape == (1, 8, 8) and img.dtype == torch.uint8
    assert int(img.min()) == 0 and int(img.max()) == 255
    assert len(torch.unique(img)) > 32  # a ramp, not clipped to white
    assert _read_image(tmp_path / "ct.png", 3).shape == (3, 8, 8)
