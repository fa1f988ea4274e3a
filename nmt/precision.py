"""Which floating-point precision a run uses: `auto` decides by measuring, never by a CPU flag.

A CPU flag does not say what is fast: on one AVX-512 BF16 machine bf16 matrix
products run at twice the fp32 speed, on another at half; and on a machine where
they run at five times, a bf16 training update was no faster (CPU flash attention's
bf16 backward ate the gain) and a one-sentence translation took twice as long. So on
a CPU with native bf16, `auto` times the run's own work in both precisions (a
training update; a translated batch and one sentence) and keeps bf16 only where it
is clearly faster at every one. The timings are cached per CPU, torch version,
thread count and workload in the user's cache directory, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nmt.errors import NmtError
from nmt.io import atomic_path, read_json

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this much, at every workload, to be chosen
MEASURE_SECONDS = 0.3
CACHE_FILE = "precision.json"
log = logging.getLogger(__name__)

Workload = Callable[[torch.dtype | None], object]  # the run's own work, once, under autocast to a dtype (None: fp32)
Timings = dict[str, dict[str, float]]  # workload -> best seconds of "fp32" and of "bf16"
Measure = Callable[[str, Mapping[str, Workload]], Timings]  # (cache key, workloads) -> timings


@dataclass(frozen=True)
class Precision:
    """The precision a run uses, why, and the measurement behind an `auto` choice."""

    name: str  # "fp32", "bf16" or "fp16"
    reason: str
    speedups: dict[str, float] = field(default_factory=dict)  # workload -> bf16 speed over fp32, when measured

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for plain float32."""
        return DTYPES[self.name]

    def describe(self) -> str:
        """What start-up messages print, e.g. "fp32 (bf16 measured 1.02x fp32 on a training update on this CPU)"."""
        return f"{self.name} ({self.reason})"

    def as_record(self) -> dict[str, object]:
        """For metrics.jsonl."""
        return {"precision": self.name, "precision_reason": self.reason,
                **{f"bf16_speedup_{name.replace(' ', '_')}": round(value, 3) for name, value in self.speedups.items()}}


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


def choose_precision(precision: str, device: torch.device, workloads: Mapping[str, Workload] | None = None,
                     key: str = "", *, native_bf16: bool | None = None, measure: Measure | None = None) -> Precision:
    """Resolve a precision name; for "auto" on a CPU with native bf16, time `workloads` in both precisions.

    `key` names the workloads for the cache (the model's shape and the batch); `native_bf16` and
    `measure` default to this machine's; tests inject them.
    """
    check_precision(precision, device)
    if precision != "auto":
        return Precision(precision, "as asked")
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] >= 8:  # Ampere and later; older GPUs only emulate bf16
            return Precision("bf16", "bf16 supported on this GPU")
        return Precision("fp16", "this GPU has no bf16")
    if device.type != "cpu":
        return Precision("fp32", f"auto keeps fp32 on {device.type}")
    if not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        return Precision("fp32", "no native bf16 on this CPU")
    timings = (measure or cached_timings)(key, workloads or {})
    speedups = {name: seconds["fp32"] / seconds["bf16"] for name, seconds in timings.items()}
    name = "bf16" if speedups and min(speedups.values()) >= BF16_MIN_SPEEDUP else "fp32"
    found = ", ".join(f"{ratio:.2f}x fp32 on {workload}" for workload, ratio in speedups.items())
    return Precision(name, f"bf16 measured {found} on this CPU", speedups)


def time_workloads(workloads: Mapping[str, Workload], seconds: float = MEASURE_SECONDS) -> Timings:
    """Best seconds of each workload in fp32 and in bf16, the two alternating so that drift hits both alike.

    The first round warms up and is not counted; the random state is put back after each call.
    """
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    best = {name: dict.fromkeys(dtypes, float("inf")) for name in workloads}
    deadline, rounds = time.perf_counter() + seconds, 0
    while rounds < 3 or (time.perf_counter() < deadline and rounds < 50):
        for name, workload in workloads.items():
            for dtype_name, dtype in dtypes.items():
                with torch.random.fork_rng(devices=[]):
                    begin = time.perf_counter()
                    workload(dtype)
                    elapsed = time.perf_counter() - begin
                if rounds:
                    best[name][dtype_name] = min(best[name][dtype_name], elapsed)
        rounds += 1
    return best


def cache_dir() -> Path:
    """NMT_CACHE_DIR, else $XDG_CACHE_HOME/nmt, else ~/.cache/nmt."""
    if os.environ.get("NMT_CACHE_DIR"):
        return Path(os.environ["NMT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nmt"


def machine_key(key: str) -> str:
    """What a measurement depends on: the CPU, torch, the thread count and the workloads."""
    parts = [*cpu_identity(), platform.machine(), torch.__version__, f"threads={torch.get_num_threads()}", key]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cached_timings(key: str, workloads: Mapping[str, Workload]) -> Timings:
    """`time_workloads`, remembered per `machine_key` in cache_dir()/precision.json.

    The cache is read and written only as a regular file: a link, a pipe or a device there is left alone
    (never written through, never waited on), and an unreadable cache is ignored with one warning.
    """
    path, entry = cache_dir() / CACHE_FILE, machine_key(key)
    cache = _read_cache(path)
    if _complete(cache.get(entry), workloads):
        return cache[entry]
    result = time_workloads(workloads)
    try:  # a read-only home only costs the measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, regular_only=True) as tmp:
            tmp.write_text(json.dumps({**cache, entry: result}), encoding="utf-8")
    except (OSError, NmtError):
        pass
    return result


def _read_cache(path: Path) -> dict[str, object]:
    """The cache's entries; {} (and one warning line) when it is there but unreadable."""
    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        cache = read_json(path, follow_symlinks=False)
    except NmtError as exc:
        log.warning("warning: %s; ignoring the precision cache", exc)
        return {}
    if not isinstance(cache, dict):
        log.warning("warning: %s: not a JSON object; ignoring the precision cache", path)
        return {}
    return cache


def _complete(stored: object, workloads: Mapping[str, Workload]) -> bool:
    """A cache entry with positive fp32 and bf16 seconds for exactly these workloads."""
    if not (isinstance(stored, dict) and set(stored) == set(workloads)):
        return False
    return all(isinstance(seconds, dict) and all(isinstance(seconds.get(d), (int, float)) and seconds[d] > 0
                                                 for d in ("fp32", "bf16")) for seconds in stored.values())


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
