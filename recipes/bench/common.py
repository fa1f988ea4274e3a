"""Shared by the benchmarks: the machine's matrix-product ceiling, peak memory and result output."""

from __future__ import annotations

import ctypes
import gc
import json
import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from nmt.precision import cpu_identity


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of a size×size matrix product: the ceiling runs are compared to."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def cpu_flags() -> list[str]:
    """The CPU features that decide bf16 and int8 speed (from /proc/cpuinfo on Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")) or "vnni" in f or "bf16" in f)


@dataclass
class Peak:
    """What `peak_memory` measured, filled in when its block exits."""

    mib: float = float("nan")
    note: str = ""


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Peak memory of the block alone, so each row reports its own footprint rather than the largest so far.

    CUDA: the caching allocator's peak of allocated tensors. CPU on Linux: the
    resident-set high-water mark (VmHWM), restarted on entry from the current
    resident set by writing 5 to /proc/self/clear_refs, after handing freed heap
    back to the OS: the trainer and translator keep freed memory (`keep_freed_memory`),
    so earlier rows would otherwise count. Where that reset is impossible, ru_maxrss,
    the peak since the process started, and the note says so.
    """
    peak = Peak()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        peak.mib = torch.cuda.max_memory_allocated(device) / 2**20
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    yield peak
    if reset:
        status = Path("/proc/self/status").read_text()
        peak.mib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    else:
        peak.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
        peak.note = "peak MiB is the process-wide peak"


def machine() -> dict[str, Any]:
    return {
        "processor": cpu_identity()[0] or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_flags": cpu_flags(),
    }


HEADERS = {"peak_mib": "peak MiB"}  # column titles that differ from the JSON keys


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(title=title)
    for column in columns:
        left = column in ("model", "mode", "precision", "note")
        table.add_column(HEADERS.get(column, column), justify="left" if left else "right")
    for row in rows:
        table.add_row(*[_cell(row.get(column, "")) for column in columns])
    Console(width=200).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
