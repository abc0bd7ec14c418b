"""Resumable runs: RNG states, the rotating checkpoint pair, and opening a run folder to start or resume.

A run folder holds ``checkpoint.pt`` (the newest) and ``checkpoint.prev.pt`` (the one before). Both are
written atomically (see :mod:`classifiers.io`), so a kill at any moment leaves at least one intact
checkpoint; a damaged newest one is named in a warning and the previous one is used. The pretraining
runner (``agents.runner``) and fine-tuning (``classifiers.finetune``) share this code.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifiers.distributed import all_gather_objects, is_distributed, rank
from classifiers.io import load_tensors, save_tensors
from classifiers.runlog import check_writable

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (the RNGs :func:`rng_state` captures)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def derived_seed(seed: int, *more: int) -> int:
    """A seed for another random stream, derived from ``(seed, *more)`` (numpy's ``SeedSequence``): different parts give
    independent streams."""
    return int(np.random.SeedSequence([seed, *more]).generate_state(1)[0])


def decorrelate_ranks(seed: int, *more: int) -> None:
    """Under torch.distributed, reseed every rank's RNGs from ``(seed, *more, rank)``, so the ranks draw different
    random numbers (each rank's mask samples its own noise). Call it after anything that must be the
    same on every rank (model initialisation). One process: nothing changes."""
    if is_distributed() and torch.distributed.get_world_size() > 1:
        seed_everything(derived_seed(seed, *more, rank()))


def run_rng_state() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (one entry in one process); all ranks must call it."""
    return all_gather_objects(rng_state())


def set_run_rng_state(states: Sequence[dict[str, Any]] | dict[str, Any], seed: int, step: int) -> None:
    """Restore this rank's entry of :func:`run_rng_state`.

    When the checkpoint holds another number of states than there are processes now (resumed with another
    ``--nproc_per_node``, or a single state from an older checkpoint under torchrun), every rank is reseeded
    from ``(seed, step, rank)`` instead, so the ranks still draw different numbers; the run goes on, but its
    random draws are no longer those of an uninterrupted run (a warning says so)."""
    saved = [states] if isinstance(states, dict) else list(states)
    world = torch.distributed.get_world_size() if is_distributed() else 1
    if len(saved) == world:
        set_rng_state(saved[rank()])
        return
    if rank() == 0:
        how = f"each is reseeded from (seed, step {step}, rank)" if world > 1 else "it continues rank 0's state"
        warnings.warn(f"the checkpoint holds the random states of {len(saved)} process(es) and {world} resume it; "
                      f"{how}, so random draws differ from an uninterrupted run", stacklevel=2)
    set_rng_state(saved[0])
    decorrelate_ranks(seed, step)


def rng_state() -> dict[str, Any]:
    """Every RNG state a run uses, as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def write_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` atomically, keeping the one before as ``checkpoint.prev.pt``."""
    path = Path(run_dir) / CHECKPOINT
    if path.exists():
        path.replace(Path(run_dir) / PREVIOUS)
    save_tensors(state, path)


def load_checkpoint(run_dir: str | Path, required_key: str) -> dict[str, Any] | None:
    """The newest intact checkpoint in ``run_dir`` (None when there is none).

    Args:
        run_dir: the run folder.
        required_key: a key every checkpoint of this kind of run holds (``core`` for pretraining,
            ``model`` for fine-tuning), so a checkpoint of another kind of run is refused.
    A damaged ``checkpoint.pt`` is named in a warning and ``checkpoint.prev.pt`` is used instead.
    """
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        try:
            state = load_tensors(path)
            if not isinstance(state, dict) or required_key not in state:
                raise ValueError(f"{path} is not a checkpoint of this kind of run (it lacks {required_key!r})")
            if errors:
                warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path}", stacklevel=2)
            return state
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        raise ValueError(" and ".join(errors) + "; no intact checkpoint remains, start the run again")
    return None


def open_run(run_dir: str | Path, resume: bool, required_key: str, main: bool = True) -> dict[str, Any] | None:
    """Prepare a run folder and return the checkpoint to continue from (None: start afresh).

    Without ``resume`` a folder that already holds a checkpoint is refused, so no run is overwritten
    by mistake. When there is nothing to resume, TensorBoard events left by a run that died before its
    first checkpoint are removed. Only the ``main`` process touches the folder.
    """
    run_dir = Path(run_dir)
    if main:
        check_writable(run_dir)
        if not resume and any((run_dir / n).exists() for n in (CHECKPOINT, PREVIOUS)):
            raise ValueError(f"run folder {run_dir} already holds a run; pass --resume to continue it "
                             "or choose another --run-dir")
    state = load_checkpoint(run_dir, required_key) if resume else None
    if state is None and main:
        for stale in run_dir.glob("events.out.tfevents.*"):
            stale.unlink()
    return state
