"""Device and thread choices, made in one place for training and translation (precision: nmt.precision)."""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch

from nmt.errors import NmtError


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NmtError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NmtError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NmtError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels, streams and NCCL of this process go to the GPU asked for
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NmtError("device 'mps' requested but MPS is not available")
    return device


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast for `dtype` on `device`, or a no-op for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory() -> None:
    """Stop glibc from returning large tensors' memory to the OS after every free.

    By default each tensor above a size threshold is a fresh mmap, so every
    batch's large activations (and a decoder's per-step logits) pay page faults
    again on every pass. Keeping freed memory in the heap makes the next batch
    reuse it (what jemalloc or tcmalloc would do). A no-op where glibc is not the
    allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters from glibc's malloc.h


def set_threads(threads: int = 0, processes: int = 1) -> int:
    """Use `threads` intra-op threads (0 = this process's share of the cores, with `processes` per machine)."""
    if threads < 0:
        raise NmtError(f"threads must be >= 0, got {threads}")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = threads or max(1, available // processes)
    torch.set_num_threads(count)
    return count


def tune_cpu(threads: int = 0, processes: int = 1) -> int:
    """The process-wide tuning that `nmt` commands opt in to: intra-op threads, the allocator, and
    TF32 matrix products for fp32 work on CUDA (tensor cores; about 10 bits of mantissa in the products,
    as every GPU trainer uses; no effect on the CPU).

    The library never calls this itself (it would change globals under a Python user);
    a script that wants the CLI's speed calls it once, before training or translating.
    Returns the thread count.
    """
    count = set_threads(threads, processes)
    keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return count
