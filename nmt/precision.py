"""Which floating-point precision a run uses: `auto` decides by measuring, never by a CPU flag.

A CPU flag does not say what is fast: on one AVX-512 BF16 machine bf16 matrix
products run at twice the fp32 speed, on another at half. So on a CPU with
native bf16, `auto` times fp32 and bf16 matrix products of the model's own
shapes (a few hundred milliseconds) and keeps bf16 only if it is clearly faster.
The figures are cached per CPU, torch version and thread count in the user's
cache directory, so later runs on the same machine start at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nmt.errors import NmtError
from nmt.io import atomic_path

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this much to pay for autocast's casts
MEASURE_SECONDS = 0.3

Shape = tuple[int, int, int]  # (rows, inner, columns) of one matrix product
Measure = Callable[[Sequence[Shape]], dict[str, float]]  # shapes -> GFLOP/s of "fp32" and "bf16"


@dataclass(frozen=True)
class Precision:
    """The precision a run uses, why, and the measurement behind an `auto` choice."""

    name: str  # "fp32", "bf16" or "fp16"
    reason: str
    gflops: dict[str, float] = field(default_factory=dict)  # matrix-product speed per candidate, when measured

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for plain float32."""
        return DTYPES[self.name]

    def describe(self) -> str:
        """What start-up messages print, e.g. "fp32 (bf16 measured 0.52x fp32 on this CPU)"."""
        return f"{self.name} ({self.reason})"

    def as_record(self) -> dict[str, object]:
        """For metrics.jsonl."""
        return {"precision": self.name, "precision_reason": self.reason,
                **{f"{name}_gflops": round(value, 1) for name, value in self.gflops.items()}}


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX-512 BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise NmtError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise NmtError("fp16 needs a GPU; use bf16 on the CPU")


def choose_precision(precision: str, device: torch.device, shapes: Sequence[Shape] = (), *,
                     native_bf16: bool | None = None, measure: Measure | None = None) -> Precision:
    """Resolve a precision name; for "auto" on a CPU with native bf16, time both on `shapes`.

    `native_bf16` and `measure` default to this machine's; tests inject them.
    """
    check_precision(precision, device)
    if precision != "auto":
        return Precision(precision, "as asked")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "bf16 supported on this GPU")
        return Precision("fp16", "this GPU has no bf16")
    if device.type != "cpu":
        return Precision("fp32", f"auto keeps fp32 on {device.type}")
    if not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        return Precision("fp32", "no native bf16 on this CPU")
    gflops = (measure or cached_measurement)(shapes)
    ratio = gflops["bf16"] / gflops["fp32"]
    name = "bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32"
    return Precision(name, f"bf16 measured {ratio:.2f}x fp32 on this CPU", gflops)


def matrix_shapes(model: nn.Module, rows: int) -> list[Shape]:
    """The distinct matrix products of `model` at `rows` rows: every weight matrix except embedding tables."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    shapes = {(rows, p.shape[1], p.shape[0]) for p in model.parameters() if p.dim() == 2 and id(p) not in tables}
    return sorted(shapes)


def measure_matmul_gflops(shapes: Sequence[Shape], seconds: float = MEASURE_SECONDS) -> dict[str, float]:
    """GFLOP/s of fp32 and bf16 on `shapes`, alternating the two so that drift hits both alike; best round each."""
    shapes = list(shapes) or [(1024, 1024, 1024)]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    generator = torch.Generator().manual_seed(0)
    operands = {name: [(torch.randn(m, k, generator=generator).to(dtype),
                        torch.randn(k, n, generator=generator).to(dtype))
                       for m, k, n in shapes] for name, dtype in dtypes.items()}
    best = dict.fromkeys(dtypes, float("inf"))
    deadline, rounds = time.perf_counter() + seconds, 0
    while rounds < 3 or (time.perf_counter() < deadline and rounds < 100):
        for name, pairs in operands.items():
            begin = time.perf_counter()
            for a, b in pairs:
                torch.mm(a, b)
            if rounds:  # the first round warms up the kernels
                best[name] = min(best[name], time.perf_counter() - begin)
        rounds += 1
    flops = sum(2.0 * m * k * n for m, k, n in shapes)
    return {name: flops / seconds_taken / 1e9 for name, seconds_taken in best.items()}


def cache_dir() -> Path:
    """NMT_CACHE_DIR, else $XDG_CACHE_HOME/nmt, else ~/.cache/nmt."""
    if os.environ.get("NMT_CACHE_DIR"):
        return Path(os.environ["NMT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nmt"


def machine_key(shapes: Iterable[Shape]) -> str:
    """What a measurement depends on: the CPU, torch, the thread count and the shapes."""
    parts = [*cpu_identity(), platform.machine(), torch.__version__, f"threads={torch.get_num_threads()}",
             repr(sorted(shapes))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cached_measurement(shapes: Sequence[Shape]) -> dict[str, float]:
    """`measure_matmul_gflops`, remembered per `machine_key` in cache_dir()/precision.json."""
    path, key = cache_dir() / "precision.json", machine_key(shapes)
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), dict) and {"fp32", "bf16"} <= cache[key].keys():
        return cache[key]
    result = measure_matmul_gflops(shapes)
    try:  # a read-only home only costs the measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({**(cache if isinstance(cache, dict) else {}), key: result}), encoding="utf-8")
    except (OSError, NmtError):
        pass
    return result


def cpu_identity() -> tuple[str, str]:
    """The CPU's model name and flags (one name can cover CPUs with other instructions)."""
    found = {"model name": platform.processor(), "flags": ""}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in found and not found.get(key.strip() + " read"):
                    found[key.strip()], found[key.strip() + " read"] = value.strip(), "yes"
    except OSError:
        pass
    return found["model name"], found["flags"]
