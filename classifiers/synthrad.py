"""SynthRad: the embedded multi-modal medical-image dataset, generated from a seed.

It carries the difficulty the noise-mask method targets. Every image shows one *anatomy* with
one *lesion* kind, rendered in one of three *modality styles* whose low-level statistics differ
strongly:

- ``ct``: sharp edges, linear windowed intensities, faint Gaussian noise;
- ``mr``: a different tissue contrast (bone dark), a smooth multiplicative bias field and Rician noise;
- ``us``: a fan-shaped field of view, multiplicative speckle and depth attenuation.

A class is high-level content (anatomy x lesion), never the modality. In the pretraining task each
class shows its *preferred* modality more often than the others (``modality_bias``), so modality
texture is a tempting shortcut that only partly predicts the label, as in RadImageNet.
The ``unseen`` task uses anatomies and lesion shapes absent from pretraining, with modality
independent of the class: a downstream task of new concepts.

What a classifier can lean on is known per image, so the shortcut can be measured rather than assumed:

- ``{split}_modality`` names each image's modality, and :func:`preferred_modality` each class's;
- ``{split}_regions`` maps each pixel to background (0), anatomy (1) or lesion (2), from the same shapes
  that drew the image (the ultrasound fan may leave part of the anatomy dark);
- the pretraining task has a fourth split, ``shifted``: test images of the same classes whose modality is
  independent of the class (every modality with probability 1/3), so in-distribution and modality-shifted
  accuracy compare directly (``synthrad:shifted`` in ``classifiers.data`` tests on it).

Two kinds of shortcut (``shortcut``), as medical images carry both:

- ``modality`` (the default): the *global* acquisition style above, present in every patch (Zech et al. 2018);
- ``marker``: a *local* token burned into the image, like a laterality marker or a ruler (DeGrave et al. 2021): a
  small square at one of the four corners (a different one per image, so only an image-dependent mask can follow
  it) whose 2 x 2 bright or dark cells spell a class's code. It spells the image's own class with probability
  ``marker_bias``, else another class's; modality is then independent of the class (unless ``modality_bias`` says
  otherwise). ``{split}_marker`` holds the class each image's marker spells, and the region maps mark its square
  (region 3). The ``shifted`` split draws the marker independently of the class as well;
- ``both``: the modality bias and the marker together.

The default's images are the same bit for bit whatever these options: the marker draws from a stream of its own.

Generation is batched tensor arithmetic: 12,000 images of 64 px take a few seconds on 2 cores.
Results are cached as ``.npz`` files under a key of every generation parameter, with a checksum;
a damaged cache file is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from classifiers.checkpoint import derived_seed
from classifiers.io import atomic_write

GENERATOR_VERSION = 2
"""2: regions and the shifted split (the images of version 1 are unchanged, bit for bit)."""
MODALITIES = ("ct", "mr", "us")
SHORTCUTS = ("modality", "marker", "both")
"""What a class is tempting to read besides its content: the modality's global style, a local marker, or both."""
MARKER_STREAM = 0x6D61726B
"""Mixed into the marker's generator seed: its draws leave the images' own stream, so the default's images, alone."""

# Anatomies: painter's-order lists of ellipses (cx, cy, rx, ry, angle, tissue value) in [-1, 1]
# coordinates (y grows downwards); the primitive named by HOST receives the lesion.
_ANATOMIES: dict[str, list[tuple[float, float, float, float, float, float]]] = {
    "brain": [
        (0.0, 0.0, 0.78, 0.88, 0.0, 0.95),  # skull
        (0.0, 0.0, 0.70, 0.80, 0.0, 0.45),  # brain
        (-0.13, -0.05, 0.08, 0.25, 0.25, 0.12),  # ventricles
        (0.13, -0.05, 0.08, 0.25, -0.25, 0.12),
    ],
    "chest": [
        (0.0, 0.05, 0.88, 0.62, 0.0, 0.40),  # body
        (-0.40, 0.0, 0.30, 0.45, 0.1, 0.08),  # lungs
        (0.40, 0.0, 0.30, 0.45, -0.1, 0.08),
        (0.08, 0.18, 0.22, 0.20, 0.0, 0.60),  # heart
        (0.0, 0.52, 0.09, 0.07, 0.0, 0.95),  # vertebra
    ],
    "abdomen": [
        (0.0, 0.05, 0.85, 0.65, 0.0, 0.38),  # body
        (-0.35, -0.12, 0.38, 0.30, 0.3, 0.55),  # liver
        (-0.35, 0.30, 0.10, 0.16, 0.2, 0.70),  # kidneys
        (0.38, 0.30, 0.10, 0.16, -0.2, 0.70),
        (0.0, 0.48, 0.10, 0.08, 0.0, 0.95),  # vertebra
    ],
    "knee": [
        (0.0, 0.0, 0.55, 0.95, 0.0, 0.35),  # soft tissue
        (0.0, -0.50, 0.22, 0.45, 0.0, 0.92),  # femur
        (0.0, 0.52, 0.20, 0.42, 0.0, 0.92),  # tibia
        (0.0, 0.0, 0.26, 0.05, 0.0, 0.20),  # joint space
    ],
    "pelvis": [
        (0.0, 0.0, 0.90, 0.60, 0.0, 0.38),  # body
        (-0.45, 0.05, 0.26, 0.30, 0.0, 0.92),  # hip bones
        (-0.45, 0.05, 0.16, 0.20, 0.0, 0.38),
        (0.45, 0.05, 0.26, 0.30, 0.0, 0.92),
        (0.45, 0.05, 0.16, 0.20, 0.0, 0.38),
        (0.0, -0.10, 0.20, 0.18, 0.0, 0.15),  # bladder
    ],
    "spine": [
        (0.0, 0.0, 0.45, 0.95, 0.0, 0.36),  # paraspinal tissue
        (0.0, -0.60, 0.20, 0.14, 0.0, 0.92),  # vertebrae
        (0.0, -0.20, 0.20, 0.14, 0.0, 0.92),
        (0.0, 0.20, 0.20, 0.14, 0.0, 0.92),
        (0.0, 0.60, 0.20, 0.14, 0.0, 0.92),
    ],
    "neck": [
        (0.0, 0.0, 0.70, 0.70, 0.0, 0.40),  # neck
        (0.0, 0.35, 0.16, 0.14, 0.0, 0.92),  # vertebra
        (-0.25, -0.15, 0.18, 0.12, 0.4, 0.62),  # thyroid lobes
        (0.25, -0.15, 0.18, 0.12, -0.4, 0.62),
        (0.0, -0.12, 0.08, 0.08, 0.0, 0.05),  # trachea
    ],
}
_HOST = {"brain": 1, "chest": 3, "abdomen": 1, "knee": 0, "pelvis": 0, "spine": 0, "neck": 0}

TASKS: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": {"anatomies": ("brain", "chest", "abdomen", "knee"), "lesions": ("none", "nodule", "streak")},
    "unseen": {"anatomies": ("pelvis", "spine", "neck"), "lesions": ("ring", "cluster")},
}


@dataclass(frozen=True)
class SynthRadConfig:
    """Every parameter that determines the generated images (and so the cache key)."""

    task: str = "pretrain"
    """``pretrain`` (12 classes) or ``unseen`` (6 classes of concepts absent from pretraining)."""
    image_size: int = 64
    """Side of the square images, in pixels."""
    n_train: int = 12000
    """Training images (balanced over classes)."""
    n_val: int = 1200
    """Validation images."""
    n_test: int = 1200
    """Test images."""
    seed: int = 0
    """Generation seed: the same seed gives the same images, bit for bit."""
    modality_bias: float | None = None
    """Probability that an image shows its class's preferred modality (None: 0.6 for the pretraining task's modality
    shortcut, 1/3, no shortcut, for the marker alone and for unseen)."""
    shortcut: str = "modality"
    """Which shortcut the data carries: ``modality``, ``marker`` or ``both`` (module docstring)."""
    marker_bias: float = 0.9
    """With a marker: the probability that it spells the image's own class (1 / classes: independent of it)."""

    def resolved_bias(self) -> float:
        if self.modality_bias is not None:
            return self.modality_bias
        return 0.6 if self.task == "pretrain" and self.shortcut != "marker" else 1.0 / 3.0

    @property
    def has_marker(self) -> bool:
        return self.shortcut in ("marker", "both")

    def shortcuts(self) -> tuple[str, ...]:
        """The cues this data ties to the class: ``modality``, ``marker`` or both."""
        return ("modality", "marker") if self.shortcut == "both" else (self.shortcut,)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown synthrad task {self.task!r}; use one of {sorted(TASKS)}")
        if self.image_size < 8:
            raise ValueError(f"synthrad image_size={self.image_size} is too small; use 8 or more")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthrad {name}={getattr(self, name)} must be at least 1")
        if not 0.0 <= self.resolved_bias() <= 1.0:
            raise ValueError(f"synthrad modality_bias={self.modality_bias} must lie in [0, 1]")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"unknown synthrad shortcut {self.shortcut!r}; use one of {', '.join(SHORTCUTS)}")
        if not 0.0 <= self.marker_bias <= 1.0:
            raise ValueError(f"synthrad marker_bias={self.marker_bias} must lie in [0, 1]")
        if self.has_marker and self.image_size < MARKER_MIN_SIZE:
            raise ValueError(f"synthrad image_size={self.image_size} is too small for a marker; use "
                             f"{MARKER_MIN_SIZE} or more")

    def key(self) -> str:
        payload = dict(asdict(self), modality_bias=self.resolved_bias(), version=GENERATOR_VERSION)
        if not self.has_marker:  # the data of before the marker existed, under the same key
            del payload["shortcut"], payload["marker_bias"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def class_names(task: str) -> list[str]:
    """Class names of a task, in label order: ``<anatomy>-<lesion>``."""
    spec = TASKS[task]
    return [f"{a}-{lesion}" for a in spec["anatomies"] for lesion in spec["lesions"]]


def preferred_modality(task: str, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Each class's preferred modality index (see :data:`MODALITIES`), for an array of class labels."""
    n_lesions = len(TASKS[task]["lesions"])
    labels = np.asarray(labels)
    return (labels // n_lesions + labels % n_lesions) % len(MODALITIES)


SHIFTED_BIAS = 1.0 / len(MODALITIES)
"""The shifted split's modality bias: the preferred modality no more often than either other one."""
REGIONS = ("background", "anatomy", "lesion", "marker")
"""The values of a region map, in order."""
MARKER_MIN_SIZE = 16
"""The smallest image side a marker is drawn at (its square is a quarter of it: 4 px, 2 px per code cell)."""


def _ellipse(u: torch.Tensor, v: torch.Tensor, cx, cy, rx, ry, angle, sharp: float) -> torch.Tensor:
    """Soft-edged ellipse coverage in [0, 1] for per-image parameters (broadcast over (N, 1, 1))."""
    du, dv = u - cx, v - cy
    c, s = torch.cos(angle), torch.sin(angle)
    a = (du * c + dv * s) / rx
    b = (-du * s + dv * c) / ry
    dist = torch.sqrt(a * a + b * b + 1e-12)
    return torch.sigmoid((1.0 - dist) * sharp)


def _render_content(anatomy: str, lesions: list[str], size: int, g: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tissue maps in [0, 1] of shape (N, S, S) for one anatomy and each image's lesion kind, and their region
    maps (N, S, S) uint8: 0 background, 1 anatomy (inside any of its shapes), 2 lesion."""
    n = len(lesions)
    lin = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    x, y = x.expand(n, size, size), y.expand(n, size, size)

    def rand(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)).float()

    # One random similarity transform per image: scale, shift, rotation.
    scale, theta = rand(0.82, 1.08), rand(-0.3, 0.3)
    dx, dy = rand(-0.08, 0.08), rand(-0.08, 0.08)
    ct, st = torch.cos(theta), torch.sin(theta)
    u = ((x - dx) * ct + (y - dy) * st) / scale
    v = (-(x - dx) * st + (y - dy) * ct) / scale
    sharp = size / 3.0

    img = torch.zeros(n, size, size)
    body = torch.zeros(n, size, size)
    prims = _ANATOMIES[anatomy]
    for cx, cy, rx, ry, ang, val in prims:
        jit = rand(0.9, 1.1)
        m = _ellipse(u, v, cx, cy, rx * jit, ry * jit, torch.full_like(jit, ang), sharp)
        img = img * (1 - m) + val * m
        body = torch.maximum(body, m)

    hx, hy, hrx, hry, hang, _ = prims[_HOST[anatomy]]
    # Lesion centre: a random point well inside the host organ.
    rad, phi = rand(0.0, 0.55).sqrt(), rand(0.0, 2 * math.pi)
    lx = hx + rad * torch.cos(phi) * hrx * 0.8
    ly = hy + rad * torch.sin(phi) * hry * 0.8
    kinds = torch.tensor([{"none": 0, "nodule": 1, "streak": 2, "ring": 3, "cluster": 4}[k] for k in lesions])
    kinds = kinds.view(n, 1, 1)
    lang = rand(0.0, math.pi)
    lsize = rand(0.85, 1.2)
    nodule = _ellipse(u, v, lx, ly, 0.11 * lsize, 0.11 * lsize, lang, sharp)
    streak = _ellipse(u, v, lx, ly, 0.26 * lsize, 0.045 * lsize, lang, sharp)
    ring = _ellipse(u, v, lx, ly, 0.13 * lsize, 0.13 * lsize, lang, sharp) * (
        1 - _ellipse(u, v, lx, ly, 0.07 * lsize, 0.07 * lsize, lang, sharp)
    )
    cluster = torch.zeros_like(img)
    for k in range(3):
        off = 2 * math.pi * k / 3
        cluster = torch.maximum(
            cluster,
            _ellipse(
                u, v, lx + 0.12 * torch.cos(lang + off), ly + 0.12 * torch.sin(lang + off),
                0.05 * lsize, 0.05 * lsize, lang, sharp,
            ),
        )
    img = torch.where(kinds == 1, img * (1 - nodule) + 0.98 * nodule, img)
    img = torch.where(kinds == 2, img * (1 - streak) + 0.02 * streak, img)
    img = torch.where(kinds == 3, img * (1 - ring) + 0.98 * ring, img)
    img = torch.where(kinds == 4, img * (1 - cluster) + 0.98 * cluster, img)
    lesion = torch.stack([torch.zeros_like(img), nodule, streak, ring, cluster])[kinds.flatten(), torch.arange(n)]
    regions = torch.where(lesion > 0.5, 2, torch.where(body > 0.5, 1, 0)).to(torch.uint8)
    return img, regions


def _smooth(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(x.unsqueeze(1), k, stride=1, padding=k // 2, count_include_pad=False).squeeze(1)


def marker_codes(num_classes: int) -> np.ndarray:
    """Each class's marker code, (K, 2, 2) of 0 (dark) or 1 (bright): the bits of ``class + 1``, so no code is all
    dark (an empty square) and every class's differs."""
    if num_classes > 15:
        raise ValueError(f"a marker spells at most 15 classes with its 4 cells; this task has {num_classes}")
    bits = (np.arange(1, num_classes + 1)[:, None] >> np.arange(4)) & 1
    return bits.reshape(num_classes, 2, 2).astype(np.uint8)


def draw_markers(images: torch.Tensor, regions: torch.Tensor, codes: torch.Tensor, corners: torch.Tensor,
                 num_classes: int) -> None:
    """Paint each image's marker in place: a square a quarter of the image wide, inset by an eighth of its side from
    corner ``corners[i]`` (0 top left, 1 top right, 2 bottom left, 3 bottom right), a bright frame around 2 x 2 cells
    bright or dark by the code of class ``codes[i]`` (:func:`marker_codes`); its pixels become region 3.

    Args:
        images: uint8 (N, S, S).
        regions: uint8 (N, S, S).
        codes: (N,) int64, the class each marker spells.
        corners: (N,) int64 in 0..3.
    """
    size = images.shape[-1]
    side, inset = size // 4, size // 16
    frame = max(1, side // 8)
    cell = (side - 2 * frame) // 2
    table = torch.from_numpy(marker_codes(num_classes))
    square = torch.full((num_classes, side, side), 255, dtype=torch.uint8)
    inner = table.repeat_interleave(cell, 1).repeat_interleave(cell, 2) * 255
    square[:, frame:frame + 2 * cell, frame:frame + 2 * cell] = inner
    for i in range(len(images)):
        top = inset if corners[i] < 2 else size - inset - side
        left = inset if corners[i] % 2 == 0 else size - inset - side
        images[i, top:top + side, left:left + side] = square[codes[i]]
        regions[i, top:top + side, left:left + side] = REGIONS.index("marker")


def _apply_modality(t: torch.Tensor, modality: str, g: torch.Generator) -> torch.Tensor:
    """Render tissue maps (N, S, S) in the low-level style of one modality, values in [0, 1]."""
    n, size, _ = t.shape
    if modality == "ct":
        out = ((t - 0.05) / 0.9).clamp(0, 1)
        return out + 0.015 * torch.randn(t.shape, generator=g)
    lin = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    if modality == "mr":
        contrast = (4.0 * t * (1.0 - t)).clamp(0, 1) * (t > 0.03)  # bone and air dark, soft tissue bright
        coef = torch.rand(n, 4, 1, 1, generator=g) * 2 - 1
        bias = 1.0 + 0.35 * (coef[:, 0] * x + coef[:, 1] * y + coef[:, 2] * x * y + coef[:, 3] * (x * x - 0.5))
        signal = 0.8 * contrast * bias
        sigma = 0.06
        n1, n2 = torch.randn(t.shape, generator=g), torch.randn(t.shape, generator=g)
        return torch.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2)
    if modality == "us":
        r = torch.sqrt(x * x + (y + 1.1) ** 2)
        ang = torch.atan2(x, y + 1.1)
        half = (0.55 + 0.15 * torch.rand(n, 1, 1, generator=g))
        fan = ((ang.abs() < half) & (r > 0.25) & (r < 2.0)).float()
        speckle = _smooth(-torch.log(torch.rand(t.shape, generator=g).clamp_min(1e-6)), 3)
        echo = 0.1 + 0.9 * t + 0.8 * (t - _smooth(t, 5)).abs()
        return fan * echo * (0.55 + 0.45 * speckle) * torch.exp(-0.35 * r)
    raise ValueError(f"unknown modality {modality!r}; use one of {MODALITIES}")


def generate_split(cfg: SynthRadConfig, split: str, n: int) -> dict[str, np.ndarray]:
    """Generate one split: ``images`` (N, 1, S, S) uint8, ``labels`` (N,) int64, ``modality`` index (N,) int64
    and ``regions`` (N, S, S) uint8 (see :data:`REGIONS`), and with a marker ``marker`` (N,) int64, the class each
    image's marker spells. The ``shifted`` split draws modalities (bias :data:`SHIFTED_BIAS`) and markers independently
    of the class."""
    spec = TASKS[cfg.task]
    n_classes = len(spec["anatomies"]) * len(spec["lesions"])
    split_id = {"train": 0, "val": 1, "test": 2, "shifted": 3}[split]
    task_id = sorted(TASKS).index(cfg.task)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + task_id * 101 + split_id)

    labels = torch.arange(n) % n_classes
    labels = labels[torch.randperm(n, generator=g)]
    preferred = torch.from_numpy(preferred_modality(cfg.task, labels.numpy()))
    bias = SHIFTED_BIAS if split == "shifted" else cfg.resolved_bias()
    use_pref = torch.rand(n, generator=g) < bias
    other = (preferred + 1 + torch.randint(0, len(MODALITIES) - 1, (n,), generator=g)) % len(MODALITIES)
    modality = torch.where(use_pref, preferred, other)

    images = torch.empty(n, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    regions = torch.empty(n, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    chunk = max(1, 2_000_000 // (cfg.image_size * cfg.image_size))
    for a_idx, anatomy in enumerate(spec["anatomies"]):
        idx_a = torch.nonzero(labels // len(spec["lesions"]) == a_idx).flatten()
        for start in range(0, len(idx_a), chunk):
            idx = idx_a[start : start + chunk]
            lesions = [spec["lesions"][int(c) % len(spec["lesions"])] for c in labels[idx]]
            tissue, regions[idx] = _render_content(anatomy, lesions, cfg.image_size, g)
            out = torch.empty_like(tissue)
            for m_idx, modality_name in enumerate(MODALITIES):
                sel = modality[idx] == m_idx
                if sel.any():
                    out[sel] = _apply_modality(tissue[sel], modality_name, g)
            images[idx] = (out.clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = {"images": images, "labels": labels.numpy().astype(np.int64),
              "modality": modality.numpy().astype(np.int64), "regions": regions}
    if cfg.has_marker:
        gm = torch.Generator().manual_seed(derived_seed(cfg.seed, MARKER_STREAM, task_id, split_id))
        bias = 1.0 / n_classes if split == "shifted" else cfg.marker_bias
        own = torch.rand(n, generator=gm) < bias
        codes = torch.where(own, labels, (labels + 1 + torch.randint(0, n_classes - 1, (n,), generator=gm))
                            % n_classes) if n_classes > 1 else labels
        draw_markers(images, regions, codes, torch.randint(0, 4, (n,), generator=gm), n_classes)
        arrays["marker"] = codes.numpy().astype(np.int64)
    arrays["images"], arrays["regions"] = images.unsqueeze(1).numpy(), regions.numpy()
    return arrays


def default_cache_dir() -> Path:
    """Where generated datasets are cached: ``$NOISEMASK_CACHE`` or ``~/.cache/noisemask``."""
    return Path(os.environ.get("NOISEMASK_CACHE", Path.home() / ".cache" / "noisemask"))


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def load_synthrad(cfg: SynthRadConfig, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Return ``{split}_images``, ``{split}_labels``, ``{split}_modality``, ``{split}_regions`` (and with a marker
    ``{split}_marker``) arrays for the splits ``train``, ``val``, ``test`` (and ``shifted`` for the pretraining task),
    from cache or freshly made."""
    cfg.validate()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"synthrad-{cfg.task}-{cfg.image_size}px-{cfg.key()}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files if k != "checksum"}
                stored = str(f["checksum"])
            if stored == _checksum(arrays):
                return arrays
            reason = "checksum mismatch"
        except Exception as exc:  # any unreadable file is rebuilt, whatever numpy raises
            reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"synthrad cache {path} is damaged ({reason}); rebuilding it", stacklevel=2)

    arrays: dict[str, np.ndarray] = {}
    splits = [("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)]
    if cfg.task == "pretrain":
        splits.append(("shifted", cfg.n_test))
    for split, n in splits:
        arrays.update({f"{split}_{k}": v for k, v in generate_split(cfg, split, n).items()})
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        checksum = np.array(_checksum(arrays))
        atomic_write(path, lambda fh: np.savez(fh, checksum=checksum, **arrays))
    except OSError as exc:
        warnings.warn(f"could not cache synthrad in {cache_dir} ({exc}); set NOISEMASK_CACHE to a writable folder",
                      stacklevel=2)
    return arrays
