"""Data-parallel training under ``torchrun``: who am I, which device, how to add up metrics.

``torchrun`` sets RANK, LOCAL_RANK and WORLD_SIZE; when WORLD_SIZE > 1 the process group is
started with NCCL on CUDA and gloo on CPU. Rank 0 alone logs, draws progress and writes files;
counts (correct predictions, loss sums, images) are summed over ranks so every rank reports the
same figures. Outside torchrun everything here is a cheap no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from compressor.errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place and returned (the identity on one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. a decision only rank 0 could make)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA if present (this process's GPU under torchrun), else CPU; anything else as given."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UserError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} asked for, but CUDA is not available here (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device: str | torch.device | None = "auto") -> DistContext:
    """Start (or join the already started) process group when under torchrun; pick the device."""
    rank, world, local = env_world()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    resolved = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
            dist.init_process_group("nccl", device_id=resolved)
        else:
            dist.init_process_group("gloo")
        # One group per process, ended at exit: re-creating a group after destroying it in the
        # same torchrun process hangs in the next collective, and a plan trains several stages.
        atexit.register(teardown)
    elif resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return DistContext(rank, world, local, resolved)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str | torch.device | None = "auto") -> Iterator[DistContext]:
    """``with session(device) as ctx:`` joins (or starts, once per process) the process group.

    The group lives until the process exits (see :func:`setup`), so several sessions in one
    process (the stages of a plan) reuse it.
    """
    yield setup(device)
