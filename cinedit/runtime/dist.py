"""The process group and devices: joining the job, collectives that work without one, autocast."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The one device choice of every command: "auto" is CUDA when available, else CPU; anything else is a torch
    device name ("cpu", "cuda", "cuda:1"). A bad name, or CUDA on a machine without it, is a ValueError."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:0': {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but torch sees no CUDA device: use 'cpu' or 'auto'")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the default process group: from torchrun's env vars when present, else a world of one.

    A single process still gets a real (gloo) group, so collectives and DDP code paths run unchanged; it uses
    an in-memory store, so nothing listens on a port. `device` is "auto" (CUDA when available), "cpu" or "cuda".
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    kind = resolve_device(device).type
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    dev = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def destroy_distributed() -> None:
    """Leave the default process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_rank() -> tuple[int, int]:
    """(world size, rank), (1, 0) without a process group."""
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (just `[obj]` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a list of floats."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on CUDA when precision is "bf16"; CPU runs stay in fp32 (exact, and CPU bf16 is slow)."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
