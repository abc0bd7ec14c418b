"""The run folder's logs: TensorBoard events and ``metrics.jsonl`` with the same scalars, plus ``config.json``.

Besides scalars, images and text, a run's own event file can hold its row of TensorBoard's HParams dashboard (the
experiment, the session's start with the settings, its end; ``tensorboard.plugins.hparams``, one row per run folder)
and a custom scalars layout (charts gathering several tags).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2
from torch.utils.tensorboard import SummaryWriter

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


def hparam_value(value: Any) -> bool | int | float | str:
    """A setting as the HParams dashboard takes it: numbers, booleans and text as they are, anything else (None, a
    tuple) as its text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    """An HParams plugin summary (``tag``: ``metadata.EXPERIMENT_TAG``, ``SESSION_END_INFO_TAG``, ...)."""
    summary = Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return summary


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

    def scalars(self, step: int, values: dict[str, float], tensorboard: Collection[str] | None = None) -> None:
        """One line of ``metrics.jsonl``; the same scalars in TensorBoard, or only those named in ``tensorboard``
        (figures TensorBoard shows otherwise, such as in a table)."""
        if not self.enabled:
            return
        for k, v in values.items():
            if tensorboard is None or k in tensorboard:
                self.writer.add_scalar(k, v, step)
        self._metrics.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._metrics.flush()

    def picture(self, step: int, tag: str, rgb: np.ndarray) -> None:
        """One RGB uint8 picture (H, W, 3), such as a drawn figure (``classifiers.figures``)."""
        if self.enabled:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        if self.enabled:
            self.writer.add_histogram(tag, values.detach().float().cpu().flatten(), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Markdown for TensorBoard's Text tab."""
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def layout(self, charts: dict[str, dict[str, list[str]]]) -> None:
        """TensorBoard's custom scalars layout: ``{category: {chart title: [tag regex, ...]}}``, each chart drawing
        every tag that matches one of its regular expressions as a line."""
        if self.enabled:
            self.writer.add_custom_scalars({category: {title: ["Multiline", tags] for title, tags in chart.items()}
                                            for category, chart in charts.items()})

    def hparams(self, settings: dict[str, Any], metrics: dict[str, str], trial: str, columns: Iterable[str] = (),
                shown: Collection[str] = ()) -> None:
        """Start this run's row of the HParams dashboard, in its own event file: the experiment (its columns) and the
        session's start (the row's values).

        Args:
            settings: the run's settings, name -> value (:func:`hparam_value` makes them numbers, booleans or text).
            metrics: the row's figures, scalar tag -> display name; TensorBoard shows each tag's last value in this
                run, so a tag written later (at the run's end) fills its cell then.
            trial: the row's name (the run folder's), so that runs of equal settings stay rows of their own.
            columns: more setting names to give a column, beyond ``settings``: TensorBoard takes the columns from one
                run's experiment when a logdir holds several, so runs whose settings differ (other agents' options)
                should all name the union.
            shown: the columns the dashboard shows before one picks others (at most five): it shows the first five
                columns marked as differing between runs, which one run cannot know, so these are marked.
        """
        if not self.enabled:
            return
        experiment = plugin_data_pb2.HParamsPluginData(experiment=api_pb2.Experiment(
            hparam_infos=[api_pb2.HParamInfo(name=name, differs=name in shown)
                          for name in sorted(set(settings) | set(columns))],
            metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name)
                          for tag, name in metrics.items()]))
        start = summary_v2.hparams_pb({k: hparam_value(v) for k, v in settings.items()}, trial_id=trial)
        for summary in (_hparams_summary(metadata.EXPERIMENT_TAG, experiment), start):
            self.writer.file_writer.add_summary(summary)

    def hparams_end(self, step: int) -> None:
        """Mark this run's HParams session finished (at ``step``)."""
        if self.enabled:
            end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
            self.writer.file_writer.add_summary(
                _hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
                    session_end_info=end)), step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._metrics.close()
