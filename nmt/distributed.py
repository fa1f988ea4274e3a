"""Data parallelism through torchrun and DistributedDataParallel, or nothing at all.

`Distributed.from_environment()` reads the variables torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK); without them every method is a cheap no-op, so the
trainer has one code path for one process and for many.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nmt.errors import NmtError

T = TypeVar("T")


def local_cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of this process: its local rank where every process sees all of the node's GPUs, and
    the only one where each sees just its own (SLURM's --gpus-per-task, CUDA_VISIBLE_DEVICES per rank)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise NmtError(f"LOCAL_RANK {local_rank} but only {visible} GPUs are visible to this process; "
                       "give each process one GPU or all of them")
    return local_rank


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Distributed:
        """Join the process group torchrun describes: NCCL on GPUs, gloo on CPUs."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device, backend = torch.device("cuda", local_cuda_index(local_rank, torch.cuda.device_count())), "nccl"
            torch.cuda.set_device(device)
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP-wrap the model; DDP also copies rank 0's parameters to every rank."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # No buffer broadcast: the models keep no running statistics, only constant tables.
        # find_unused_parameters must stay off: the trainer's loss uses the output matrix outside the
        # wrapped forward (features_only), which DDP's unused-parameter search would mark ready twice.
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce for all but the last batch of an accumulated update."""
        if self.enabled and skip:
            return model.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def _reduce(self, value: float, dtype: torch.dtype, op: Any = dist.ReduceOp.SUM) -> Any:
        tensor = torch.tensor([value], dtype=dtype, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.item()

    def close(self) -> None:
        """Leave the process group (at the end of a process's training), so NCCL exits cleanly."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` summed, in place, in one all-reduce (several statistics at once)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max_int(self, value: int) -> int:
        return int(self._reduce(value, torch.int64, dist.ReduceOp.MAX)) if self.enabled else value

    def any_true(self, flag: bool) -> bool:
        """One rank's decision (e.g. a time limit) becomes every rank's, so none waits forever."""
        return bool(self.max_int(int(flag))) if self.enabled else flag

    def main_only(self, action: Callable[[], T]) -> T | None:
        """Run `action` on rank 0 only; an NmtError it raises is raised on every rank, so none waits forever."""
        value, error = None, None
        if self.is_main:
            try:
                value = action()
            except NmtError as exc:
                error = str(exc)
        error = self.broadcast_object(error)
        if error is not None:
            raise NmtError(error)
        return value

    def broadcast_object(self, value: Any) -> Any:
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value: Any) -> list[Any]:
        """Every rank's value, on every rank (used for per-rank RNG states)."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
