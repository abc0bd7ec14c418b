"""The image cache: built once, found again by its key, rebuilt when a file changes, never taken half-written, and
read as exactly the tensors the files give."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classifiers import data as data_module
from classifiers import imagecache
from classifiers.data import DataError, ImageSource, auto_workers, load_dataset, make_loader
from classifiers.io import _umask


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own cache folder; its images/ is where the image caches go."""
    monkeypatch.setenv("NOISEMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NOISEMASK_IMAGE_CACHE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return tmp_path / "cache" / "images"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``train/{a,b}`` with 5 JPEGs and 5 PNGs of mixed sizes and modes each, ``val/{a,b}`` with 2 each."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 2)):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(14, 40, 2))
                im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                im = im.convert("L") if i % 3 == 0 else im
                im.save(d / f"{i:02d}.{'jpg' if i % 2 else 'png'}")
    return tmp_path / "data"


def npy_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.npy"))


def epoch_batches(data, split: str, train: bool, epoch: int = 0, workers: int = 0) -> list[torch.Tensor]:
    loader = make_loader(data, split, 4, train=train, seed=3, workers=workers)
    loader.sampler.set_epoch(epoch)
    return [x for x, _ in loader]


def test_a_miss_builds_the_cache_and_a_hit_reads_no_image(root, cache_dir, monkeypatch):
    data = load_dataset(f"imagefolder:{root}", image_size=16, channels=3)
    assert [len(np.load(f, mmap_mode="r")) for f in npy_files(cache_dir)] == [20, 4]  # train, val
    assert data.splits["train"].cached is not None and data.splits["val"].cached is not None

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was decoded although the cache holds it")

    monkeypatch.setattr(data_module, "stored_image", no_reading)
    monkeypatch.setattr(imagecache, "_build", no_reading)
    again = load_dataset(f"imagefolder:{root}", image_size=16, channels=3)
    first, second = epoch_batches(data, "train", True), epoch_batches(again, "train", True)
    assert len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


def test_cached_and_uncached_give_the_same_tensors(root, cache_dir):
    cached = load_dataset(f"imagefolder:{root}", image_size=16)
    files = load_dataset(f"imagefolder:{root}", image_size=16, cache=False)
    assert cached.splits["train"].cached is not None and files.splits["train"].cached is None
    for split, train, epoch in (("train", True, 0), ("train", True, 1), ("val", False, 0)):
        a, b = epoch_batches(cached, split, train, epoch), epoch_batches(files, split, train, epoch)
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), (split, epoch)
    few_cached = load_dataset(f"imagefolder:{root}", image_size=16, train_per_class=3, seed=1)
    few_files = load_dataset(f"imagefolder:{root}", image_size=16, train_per_class=3, seed=1, cache=False)
    assert all(torch.equal(x, y) for x, y in zip(epoch_batches(few_cached, "train", True),
                                                  epoch_batches(few_files, "train", True)))


def test_eval_images_are_pillow_decoded_resized_and_centre_cropped(root, cache_dir):
    from torchvision.transforms import v2

    data = load_dataset(f"imagefolder:{root}", image_size=12, channels=3)
    x = torch.cat(epoch_batches(data, "val", False))
    for i, f in enumerate(data.splits["val"].files):
        with Image.open(f) as im:
            ref = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        ref = v2.CenterCrop(12)(v2.Resize(12, antialias=True)(ref))
        assert torch.equal(x[i], ref), f


def test_workers_read_the_cache_as_the_process_does(root, cache_dir):
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    a, b = epoch_batches(data, "train", True, workers=0), epoch_batches(data, "train", True, workers=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_changed_or_added_file_rebuilds_the_cache(root, cache_dir):
    load_dataset(f"imagefolder:{root}", image_size=16)
    first = npy_files(cache_dir)
    target = root / "train" / "a" / "03.jpg"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, newer time
    load_dataset(f"imagefolder:{root}", image_size=16)
    touched = npy_files(cache_dir)
    assert len(touched) == 2 and touched != first  # the train cache rebuilt, the old one deleted
    Image.fromarray(np.full((20, 20), 9, np.uint8)).save(target, format="JPEG")  # new content, new size
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    assert len(npy_files(cache_dir)) == 2 and not set(npy_files(cache_dir)) & set(touched) - set(first)
    index = data.splits["train"].files.index(target)
    assert int(data.splits["train"].cached[index].float().mean().round()) in range(7, 12)
    Image.fromarray(np.full((20, 20), 250, np.uint8)).save(root / "train" / "b" / "new.png")
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    assert len(data.splits["train"]) == 21 and len(data.splits["train"].cached) == 21
    assert sorted(len(np.load(f, mmap_mode="r")) for f in npy_files(cache_dir)) == [4, 21]


def test_another_image_size_or_channel_count_is_another_cache(root, cache_dir):
    load_dataset(f"imagefolder:{root}", image_size=16)
    load_dataset(f"imagefolder:{root}", image_size=24)
    load_dataset(f"imagefolder:{root}", image_size=16, channels=3)
    shapes = sorted(np.load(f, mmap_mode="r").shape[1:] for f in npy_files(cache_dir))
    assert shapes == [(1, 16, 16), (1, 16, 16), (1, 24, 24), (1, 24, 24), (3, 16, 16), (3, 16, 16)]


def test_an_interrupted_build_leaves_no_cache(root, cache_dir, monkeypatch):
    real, calls = data_module.stored_image, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(data_module, "stored_image", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_dataset(f"imagefolder:{root}", image_size=16)
    assert list(cache_dir.iterdir()) == []  # neither a cache nor a temporary file
    monkeypatch.setattr(data_module, "stored_image", real)
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    assert len(npy_files(cache_dir)) == 2 and len(data.splits["train"].cached) == 20


def test_a_damaged_cache_is_rebuilt(root, cache_dir):
    reference = epoch_batches(load_dataset(f"imagefolder:{root}", image_size=16), "val", False)
    for f in npy_files(cache_dir):
        f.write_bytes(f.read_bytes()[:200])
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        data = load_dataset(f"imagefolder:{root}", image_size=16)
    assert all(torch.equal(x, y) for x, y in zip(reference, epoch_batches(data, "val", False)))


def test_cache_off_unwritable_or_short_of_space_reads_the_files(root, cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("NOISEMASK_IMAGE_CACHE", "0")
    assert load_dataset(f"imagefolder:{root}", image_size=16).splits["train"].cached is None
    assert not cache_dir.exists()
    monkeypatch.delenv("NOISEMASK_IMAGE_CACHE")
    monkeypatch.setattr(imagecache, "SPARE_BYTES", 1 << 62)
    with pytest.warns(UserWarning, match="needs .* GB free; reading the images uncached"):
        assert load_dataset(f"imagefolder:{root}", image_size=16).splits["train"].cached is None
    monkeypatch.undo()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NOISEMASK_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not write the image cache"):
        data = load_dataset(f"imagefolder:{root}", image_size=16)
    assert data.splits["train"].cached is None and len(epoch_batches(data, "train", True)) == 5


def test_other_processes_wait_for_the_builder(root, cache_dir, monkeypatch):
    files = sorted((root / "train").rglob("*.png"))

    def images():
        for f in files:
            yield data_module.stored_image(f, 8, 1)

    monkeypatch.setenv("LOCAL_RANK", "1")  # no build of its own: none is there, and nobody builds it
    with pytest.warns(UserWarning, match="no process built the image cache"):
        assert imagecache.open_or_build(files, 8, 1, "data train", "origin", images, patience=0.05) is None
    assert not cache_dir.exists() or npy_files(cache_dir) == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    built = imagecache.open_or_build(files, 8, 1, "data train", "origin", images)
    monkeypatch.setenv("LOCAL_RANK", "1")
    found = imagecache.open_or_build(files, 8, 1, "data train", "origin", images, patience=0.05)
    assert found is not None and all(torch.equal(built[i], found[i]) for i in range(len(files)))


def test_workers_are_chosen_from_the_cores(root, cache_dir, monkeypatch):
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    files = ImageSource(labels=data.splits["train"].labels, files=data.splits["train"].files)
    memory = ImageSource(labels=np.zeros(2, np.int64), images=torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    for cores, expected in ((1, 0), (2, 0), (3, 0), (4, 2), (6, 3), (32, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert auto_workers(files) == expected, cores
        assert auto_workers(data.splits["train"]) == 0 and auto_workers(memory) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 32 cores shared by 4 processes
    assert auto_workers(files) == 4
    assert make_loader(data, "train", 4, train=True, workers=3).num_workers == 3


def test_the_build_decodes_in_workers_on_larger_machines(root, cache_dir, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(data_module, "BUILD_BATCH", 2)  # 20 files: 4 workers
    seen = []
    real = data_module.DataLoader
    monkeypatch.setattr(data_module, "DataLoader", lambda *a, **k: seen.append(k["num_workers"]) or real(*a, **k))
    cached = load_dataset(f"imagefolder:{root}", image_size=16)
    assert seen == [4, 0]  # train in 4 workers; val's 4 files in the process
    files = load_dataset(f"imagefolder:{root}", image_size=16, cache=False)
    assert all(torch.equal(x, y) for x, y in zip(epoch_batches(cached, "train", True, workers=0),
                                                  epoch_batches(files, "train", True, workers=0)))
    (root / "train" / "b" / "07.jpg").write_bytes(b"")
    with pytest.raises(DataError) as exc:
        load_dataset(f"imagefolder:{root}", image_size=16)
    assert str(exc.value) == (f"cannot read image {root / 'train' / 'b' / '07.jpg'} (the file is empty, 0 bytes); "
                              "replace or remove the file")
    assert len(npy_files(cache_dir)) == 2  # the complete caches of before stay; nothing half-written


def test_cached_images_pickle_without_their_pixels(root, cache_dir):
    import pickle

    cached = load_dataset(f"imagefolder:{root}", image_size=16).splits["train"].cached
    copy = pickle.loads(pickle.dumps(cached.subset(np.array([5, 2]))))  # what a spawned worker receives
    assert len(pickle.dumps(copy)) < 1000 and torch.equal(copy[0], cached[5]) and torch.equal(copy[1], cached[2])


def test_a_killed_builds_leftover_neither_stalls_the_waiting_processes_nor_stays(root, cache_dir, monkeypatch):
    """A temporary file that stops growing is a killed build's: the waiting processes give up after their patience
    instead of waiting forever, and the next build removes it once it is older than the patience."""
    files = sorted((root / "train").rglob("*.png"))

    def images():
        for f in files:
            yield data_module.stored_image(f, 8, 1)

    built = imagecache.open_or_build(files, 8, 1, "data train", "origin", images)
    final = built.path
    leftover = final.parent / f".{final.name}.killed.tmp"
    leftover.write_bytes(b"\0" * 64)
    final.unlink()
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.warns(UserWarning, match="no process built the image cache"):
        assert imagecache.open_or_build(files, 8, 1, "data train", "origin", images, patience=0.2) is None
    old = os.stat(leftover).st_mtime - 3600
    os.utime(leftover, (old, old))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert imagecache.open_or_build(files, 8, 1, "data train", "origin", images, patience=60) is not None
    assert not leftover.exists() and final.exists()
    assert final.stat().st_mode & 0o777 == 0o666 & ~_umask()  # readable by others as any file the user writes


def test_one_folder_spelled_two_ways_has_one_cache(root, cache_dir, monkeypatch):
    load_dataset(f"imagefolder:{root}", image_size=16, channels=1)
    first = npy_files(cache_dir)
    monkeypatch.chdir(root.parent)
    load_dataset(f"imagefolder:{root.name}", image_size=16, channels=1)
    assert npy_files(cache_dir) == first


def test_a_few_shot_run_caches_no_training_split(root, cache_dir):
    data = load_dataset(f"imagefolder:{root}", image_size=16, channels=1, train_per_class=2, seed=0)
    assert data.splits["train"].cached is None and len(data.splits["train"]) == 4
    assert [len(np.load(f, mmap_mode="r")) for f in npy_files(cache_dir)] == [4]  # val only
