"""Files that never end half-written and never run code when read back."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(fh)`` into a temporary file, flush, fsync, then rename.

    A crash at any moment leaves either the previous file or the complete new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the permissions open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_tensors(obj: Any, path: str | Path) -> None:
    """``torch.save`` made atomic. ``obj`` must hold only tensors and plain values."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


class UnsafeCheckpointError(ValueError):
    """A file asked to run code (or held objects other than tensors and plain values) when loaded."""


def load_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by :func:`save_tensors` with ``weights_only=True``.

    Raises ``FileNotFoundError`` for a missing file, :class:`UnsafeCheckpointError` for a file that
    would execute code under pickle, and ``ValueError`` naming the file when it is damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise UnsafeCheckpointError(
                f"{path} holds objects that would run code when unpickled; refused (only tensors and "
                "plain values are loaded). Re-save it from trusted code with save_tensors()"
            ) from None
        raise ValueError(f"{path} is damaged or not a checkpoint ({exc}); use an intact copy") from None
    except (RuntimeError, EOFError, OSError, KeyError, IndexError) as exc:  # garbage bytes raise any of these
        raise ValueError(f"{path} is damaged or half-written ({type(exc).__name__}: {exc}); "
                         "use an intact copy") from None
