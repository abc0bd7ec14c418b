"""torch.distributed set-up from torchrun's environment, and the few collectives the project uses."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); return ``(rank, world_size)``.

    NCCL on CUDA, gloo on CPU. Without torchrun's variables, nothing happens and ``(0, 1)`` is returned.
    Under CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun), valid before and after the group."""
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that writes logs and files (rank 0, or the only process)."""
    return rank() == 0


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (``x`` itself when not distributed)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average ``module``'s floating-point buffers (BatchNorm running statistics) over all processes.

    DDP broadcasts rank 0's buffers before each forward, but the last forward updates them per rank;
    averaging before evaluation and saving makes every rank hold the same model, with statistics from
    all the data. Integer buffers (batch counters) are equal on every rank and taken from rank 0.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf /= world
        else:
            dist.broadcast(buf, src=0)


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def require_same(value: object, what: str, fix: str) -> None:
    """Raise ``ValueError`` naming every rank's ``value`` and ``fix`` unless all ranks hold the same one."""
    values = all_gather_objects(value)
    if len(set(values)) > 1:
        ranks = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
        raise ValueError(f"the processes resolved different {what} ({ranks}); {fix}")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
