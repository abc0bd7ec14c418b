"""The run folder's logs: TensorBoard events and ``metrics.jsonl`` with the same scalars, plus ``config.json``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from classifiers.io import atomic_write


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove it writable; raise ``ValueError`` naming it otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"run folder {folder} cannot be written ({exc.strerror}); choose another --run-dir") \
            from None
    return folder


def hparams_table(config: dict[str, Any]) -> str:
    """A Markdown table of the configuration, for TensorBoard's text tab."""
    rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(config.items()))
    return f"|param|value|\n|-|-|\n{rows}"


class ScalarWindow:
    """Per-step scalars averaged over a logging window.

    Values stay tensors until :meth:`means`, so recording them does not synchronise the device every step.
    """

    def __init__(self) -> None:
        self._paused = False
        self.reset()

    def reset(self) -> None:
        """Start a new window (and its clock)."""
        self.values: dict[str, list[torch.Tensor]] = {}
        self.steps = 0
        self.start = time.perf_counter()
        self.excluded = 0.0

    def add(self, values: dict[str, float | torch.Tensor]) -> None:
        """Record one step's scalars."""
        for k, v in values.items():
            self.values.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32).detach())
        self.steps += 1

    def means(self) -> dict[str, torch.Tensor]:
        """The mean of each scalar over the window, as 0-d tensors."""
        return {k: torch.stack(v).mean() for k, v in self.values.items()}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Keep the block's time off the window's clock: the run's bookkeeping between steps (logging, evaluation,
        checkpoints), so that images per second measure the steps; also when the block closes and resets the window
        (only the part after the reset is this window's), and a block inside another counts once."""
        if self._paused:
            yield
            return
        self._paused, since = True, time.perf_counter()
        try:
            yield
        finally:
            self._paused = False
            self.excluded += time.perf_counter() - max(since, self.start)

    def elapsed(self) -> float:
        """Seconds of steps since the window started (the excluded bookkeeping left out)."""
        return time.perf_counter() - self.start - self.excluded


class Throughput:
    """The ``perf/`` scalars of a logging window: ``perf/images_per_second`` over the window's steps (its clock,
    bookkeeping excluded), and ``perf/overhead``, the share of the wall time since the previous window's close that
    went to the run's bookkeeping (logging, diagnostics, image grids, evaluation, checkpoints) rather than steps."""

    def __init__(self) -> None:
        self.closed = time.perf_counter()

    def close(self, window: ScalarWindow, images: int) -> dict[str, float]:
        now = time.perf_counter()
        steps, wall = max(window.elapsed(), 1e-9), max(now - self.closed, 1e-9)
        self.closed = now
        return {"perf/images_per_second": images / steps, "perf/overhead": max(0.0, 1.0 - steps / wall)}


class RunLogger:
    """Scalars to TensorBoard and to ``metrics.jsonl`` (one JSON object per logging step), plus images.

    Only the main process writes (``enabled``). On resume, ``metrics.jsonl`` is cut back to
    ``resume_offset`` bytes and TensorBoard events after ``purge_step`` are dropped, so a resumed run's
    logs equal an uninterrupted run's.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: int | None = None,
                 resume_offset: int | None = None) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        if not enabled:
            return
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_offset is not None and self.metrics_path.exists():
            with open(self.metrics_path, "r+b") as fh:
                fh.truncate(resume_offset)
        elif resume_offset is None:
            self.metrics_path.unlink(missing_ok=True)
        self.writer = SummaryWriter(str(self.run_dir), purge_step=purge_step)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")

    def offset(self) -> int:
        """Bytes of ``metrics.jsonl`` written so far (stored in checkpoints)."""
        if not self.enabled:
            return 0
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        return self._metrics.tell()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self._metrics.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._metrics.flush()

    def images(self, step: int, tag: str, batch: torch.Tensor, nrow: int = 8) -> None:
        """A grid of images (N, C, H, W) with values in [0, 1]."""
        if self.enabled:
            self.writer.add_image(tag, make_grid(batch.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=1), step)

    def picture(self, step: int, tag: str, rgb: np.ndarray) -> None:
        """One RGB uint8 picture (H, W, 3), such as a drawn figure (``classifiers.figures``)."""
        if self.enabled:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        if self.enabled:
            self.writer.add_histogram(tag, values.detach().float().cpu().flatten(), step)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, 0)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._metrics.close()
