"""Hostile and odd image files are read correctly or refused with one line naming the file; odd settings too."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import finetune as finetune_script
import numpy as np
import pretrain as pretrain_script
import pytest
import torch
from PIL import Image

from classifiers import data as data_module
from classifiers.cli import fail_cleanly
from classifiers.data import DataError, _read_image, _stretch_to_uint8, load_dataset, make_loader

TINY = ["--image-size", "32", "--grid", "8", "--batch-size", "4", "--max-steps", "2", "--device", "cpu"]


def folder(root: Path, per_class: int = 3, size: tuple[int, int] = (20, 16)) -> Path:
    """``root/{train,val}/{a,b}/<i>.png``: small grayscale PNGs of a few grey levels."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(np.full(size[::-1], 30 * i + 10, np.uint8)).save(d / f"{i}.png")
    return root


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` gray pixels and holds none: what a decompression bomb shows Pillow
    before any pixel is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def pillow_reference(path: Path, channels: int) -> torch.Tensor:
    """What Pillow alone makes of a file (the reader before torchvision.io), uint8 (C, H, W)."""
    with Image.open(path) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency converted to RGB
        im.load()
        if im.mode.startswith(("I", "F")):
            arr = _stretch_to_uint8(np.asarray(im, dtype=np.float64))
            arr = np.repeat(arr[..., None], 3, axis=2) if channels == 3 else arr
        else:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def smooth_rgb(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 255 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def refuse(main, argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    code = fail_cleanly(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# --- what torchvision.io reads is what Pillow reads -------------------------------------------------

def _files(tmp_path: Path) -> dict[str, Path]:
    rgb = smooth_rgb()
    images = {
        "gray.jpg": (Image.fromarray(rgb[..., 0]), {"quality": 90}),
        "colour.jpg": (Image.fromarray(rgb), {"quality": 90}),
        "progressive.jpg": (Image.fromarray(rgb), {"quality": 75, "progressive": True}),
        "gray.png": (Image.fromarray(rgb[..., 1]), {}),
        "gray-alpha.png": (Image.fromarray(rgb[..., 1]).convert("LA"), {}),
        "one-bit.png": (Image.fromarray(rgb[..., 0] > 128), {}),
        "colour.png": (Image.fromarray(rgb), {}),
        "colour-alpha.png": (Image.fromarray(rgb).convert("RGBA"), {}),
        "palette.png": (Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32), {}),
        "palette-transparent.png": (Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32),
                                    {"transparency": bytes([0, 128] + [255] * 30)}),
        "16-bit.png": (Image.fromarray(rgb[..., 0].astype(np.uint16) * 251 + 7), {}),
    }
    paths = {}
    for name, (im, options) in images.items():
        im.save(tmp_path / name, **options)
        paths[name] = tmp_path / name
    return paths


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_io_reads_the_pixels_pillow_reads(tmp_path, monkeypatch, channels):
    decoded = []
    real = data_module.decode_image
    monkeypatch.setattr(data_module, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    for name, path in _files(tmp_path).items():
        before = len(decoded)
        img = _read_image(path, channels)
        assert len(decoded) == before + 1, f"{name} was not decoded by torchvision.io"
        assert img.dtype == torch.uint8 and img.shape == (channels, 40, 56), name
        assert torch.equal(img, pillow_reference(path, channels)), name


def test_own_channel_count_follows_pillow_modes(tmp_path):
    files = _files(tmp_path)
    gray = ["gray.jpg", "gray.png", "gray-alpha.png", "one-bit.png", "palette.png", "palette-transparent.png",
            "16-bit.png"]
    for name, path in files.items():
        assert _read_image(path, None).shape[0] == (1 if name in gray else 3), name


def test_16_bit_png_is_stretched_like_pillow_reads_it(tmp_path):
    ramp = np.linspace(1000, 50000, 96, dtype=np.uint16).reshape(8, 12)
    Image.fromarray(ramp).save(tmp_path / "ct.png")
    img = _read_image(tmp_path / "ct.png", 1)
    assert int(img.min()) == 0 and int(img.max()) == 255
    assert torch.equal(img[0], torch.from_numpy(_stretch_to_uint8(ramp.astype(np.float64))))


# --- formats only Pillow reads --------------------------------------------------------------------

def test_16_bit_tiff_is_read_by_pillow_and_stretched(tmp_path):
    ramp = np.linspace(0, 60000, 96, dtype=np.uint16).reshape(8, 12)
    Image.fromarray(ramp).save(tmp_path / "mr.tif")
    for channels in (1, 3):
        img = _read_image(tmp_path / "mr.tif", channels)
        assert img.shape == (channels, 8, 12) and int(img.min()) == 0 and int(img.max()) == 255
        assert torch.equal(img, pillow_reference(tmp_path / "mr.tif", channels))


def test_cmyk_jpeg_is_read_by_pillow_as_colour(tmp_path):
    Image.fromarray(smooth_rgb()).convert("CMYK").save(tmp_path / "print.jpg")
    assert _read_image(tmp_path / "print.jpg", None).shape == (3, 40, 56)
    for channels in (1, 3):
        assert torch.equal(_read_image(tmp_path / "print.jpg", channels),
                           pillow_reference(tmp_path / "print.jpg", channels))


# --- refused, one line naming the file -----------------------------------------------------------

def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(DataError) as exc:
        _read_image(path, 1)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and "replace or remove the file" in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.mark.parametrize("side", [30000, 10000])
def test_decompression_bomb_is_refused(tmp_path, side):
    (tmp_path / "bomb.png").write_bytes(png_header(side, side))
    _refused(tmp_path / "bomb.png", "decompression bomb")


def test_a_strip_too_long_to_resize_is_refused(tmp_path):
    Image.fromarray(np.zeros((1, 30000), np.uint8)).save(tmp_path / "strip.png")  # at 64 px: 1,920,000 x 64
    with pytest.raises(DataError, match=r"strip.png \(30000 x 1 px is too elongated to resize to 64 px; crop"):
        data_module.stored_image(tmp_path / "strip.png", 64, 1)
    assert data_module.stored_image(tmp_path / "strip.png", 8, 1).shape == (1, 8, 8)  # at 8 px: 240,000 x 8, fine


def test_zero_byte_file_is_refused(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    _refused(tmp_path / "empty.png", "empty, 0 bytes")


def test_truncated_and_garbage_files_are_refused(tmp_path):
    Image.fromarray(smooth_rgb()).save(tmp_path / "cut.jpg", quality=90)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.jpg", "truncated")
    (tmp_path / "text.png").write_bytes(b"hello, not an image at all")
    _refused(tmp_path / "text.png", "not an image format")


def test_symlink_loop_and_dangling_link_are_refused(tmp_path):
    (tmp_path / "loop.png").symlink_to("loop.png")
    _refused(tmp_path / "loop.png", "symbolic links")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _refused(tmp_path / "gone.png", "No such file")


def test_one_pixel_image_is_read_and_resized(tmp_path):
    root = folder(tmp_path / "data")
    Image.fromarray(np.full((1, 1), 77, np.uint8)).save(root / "train" / "b" / "tiny.png")
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    index = [str(f) for f in data.splits["train"].files].index(str(root / "train" / "b" / "tiny.png"))
    x, _ = make_loader(data, "train", 1, train=False).dataset[index]
    assert x.shape == (1, 16, 16) and bool((x == 77).all())


def test_one_pixel_first_image_cannot_set_the_image_size(tmp_path):
    root = folder(tmp_path / "data")
    Image.fromarray(np.full((1, 1), 77, np.uint8)).save(root / "train" / "a" / "0.png")
    with pytest.raises(DataError, match=r"1 x 1 px, too small to set the image size; give the image size"):
        load_dataset(f"imagefolder:{root}")
    assert load_dataset(f"imagefolder:{root}", image_size=8).image_size == 8


def test_names_with_spaces_and_non_ascii_characters(tmp_path):
    root = folder(tmp_path / "data set")
    odd = root / "train" / "a" / "scan 7 – Größe ü 画像.png"
    Image.fromarray(np.full((16, 20), 200, np.uint8)).save(odd)
    data = load_dataset(f"imagefolder:{root}", image_size=8)
    assert odd in data.splits["train"].files
    xs = torch.cat([x for x, _ in make_loader(data, "train", 7, train=False)])
    assert xs.shape == (7, 1, 8, 8) and bool((xs == 200).all(dim=(1, 2, 3)).any())
    odd.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as exc:
        load_dataset(f"imagefolder:{root}", image_size=8)
    assert odd.name in str(exc.value)


def test_uncached_read_error_from_a_worker_is_one_line(tmp_path):
    root = folder(tmp_path / "data")
    (root / "train" / "a" / "1.png").write_bytes(b"")
    data = load_dataset(f"imagefolder:{root}", image_size=8, cache=False)  # no cache: checked when read
    with pytest.raises(DataError) as exc:
        list(make_loader(data, "train", 2, train=False, workers=1))
    assert str(exc.value) == (f"cannot read image {root / 'train' / 'a' / '1.png'} (the file is empty, 0 bytes); "
                              "replace or remove the file")


# --- through the scripts: one line, no traceback, nothing saved lost -------------------------------

@pytest.mark.parametrize("name", ["0_bomb.png", "z_bomb.png"])  # the first file (it sets the size) or a later one
def test_pretrain_refuses_a_bomb_in_one_line(tmp_path, capsys, name):
    root = folder(tmp_path / "data")
    (root / "train" / "a" / name).write_bytes(png_header(30000, 30000))
    refuse(pretrain_script.main, ["--dataset", f"imagefolder:{root}", *TINY, "--run-dir", str(tmp_path / "run")],
           capsys, name, "decompression bomb")


def test_finetune_refuses_a_symlink_loop_in_one_line(tmp_path, capsys):
    root = folder(tmp_path / "data")
    (root / "val" / "b" / "loop.jpg").symlink_to("loop.jpg")
    refuse(finetune_script.main, ["--init", "scratch", "--dataset", f"imagefolder:{root}", "--device", "cpu",
                                  "--epochs", "1", "--batch-size", "2", "--run-dir", str(tmp_path / "run")],
           capsys, "loop.jpg", "symbolic links")


def test_a_bad_file_added_before_resuming_loses_nothing(tmp_path, capsys):
    root = folder(tmp_path / "data")
    run = tmp_path / "run"
    argv = ["--dataset", f"imagefolder:{root}", *TINY, "--run-dir", str(run)]
    assert pretrain_script.main(argv) == 0
    capsys.readouterr()
    saved = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    refuse(pretrain_script.main, [*argv, "--resume", "--max-steps", "4"], capsys, "empty.png", "0 bytes")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == saved


# --- odd settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needles", [
    (["--image-size", "0"], ["image size 0", "use 8 or more"]),
    (["--image-size", "-32"], ["image size -32", "use 8 or more"]),
    (["--lr", "inf"], ["learning rate inf", "positive"]),
    (["--lr", "nan"], ["learning rate nan", "positive"]),
    (["--policy-lr", "inf"], ["policy learning rate inf", "positive finite number"]),
    (["--policy-lr", "nan"], ["policy learning rate nan", "positive finite number"]),
    (["--algo", "ppo", "--policy-lr", "inf"], ["policy learning rate inf", "positive finite number"]),
    (["--algo", "a2c", "--policy-lr=-inf"], ["policy learning rate -inf", "positive finite number"]),
])
def test_pretrain_refuses_odd_settings(tmp_path, capsys, flags, needles):
    refuse(pretrain_script.main, [*TINY, *flags, "--run-dir", str(tmp_path / "run")], capsys, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, needles", [
    (["--image-size", "0"], ["image size 0", "use 8 or more"]),
    (["--image-size", "-1"], ["image size -1", "use 8 or more"]),
    (["--lr", "inf"], ["learning rate inf", "positive"]),
    (["--lr", "nan"], ["learning rate nan", "positive"]),
])
def test_finetune_refuses_odd_settings(tmp_path, capsys, flags, needles):
    refuse(finetune_script.main, ["--init", "scratch", "--device", "cpu", *flags, "--run-dir", str(tmp_path / "run")],
           capsys, *needles)
    assert not (tmp_path / "run").exists()
