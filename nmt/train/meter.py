"""Training-log numbers: the loss and tokens since the last log line, and the clocks behind the rates.

Rates count training time only: validation can take as long as training (an untrained model
decodes to the length limit), and a tokens/s that included it would say nothing about either.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any


class TrainMeter:
    """Sums since the last `record`, wall time since the run began (earlier processes included), and
    the part of it spent validating."""

    def __init__(self, elapsed: float = 0.0, validation_seconds: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.origin = clock() - elapsed
        self.validation_seconds = validation_seconds
        self._open_window(clock())

    def _open_window(self, now: float) -> None:
        self.loss = self.nll = 0.0
        self.tokens = 0
        self.window_start, self.window_validation = now, 0.0

    def add(self, loss: float, nll: float, tokens: int) -> None:
        """One update's summed loss, NLL and target tokens."""
        self.loss += loss
        self.nll += nll
        self.tokens += tokens

    def exclude(self, seconds: float) -> None:
        """Validation took `seconds`: count them apart from training time."""
        self.validation_seconds += seconds
        self.window_validation += seconds

    def elapsed(self) -> float:
        """Wall-clock seconds of the whole run, validation included (what train.max_minutes limits)."""
        return self.clock() - self.origin

    def training_seconds(self) -> float:
        return self.elapsed() - self.validation_seconds

    def record(self, update: int, epoch: int, lr: float) -> dict[str, Any]:
        """The `train` record of metrics.jsonl for the updates since the last one; starts a new window."""
        now = self.clock()
        tokens = max(self.tokens, 1)
        record = {
            "kind": "train",
            "update": update,
            "epoch": epoch,
            "loss": self.loss / tokens,
            "nll": self.nll / tokens,
            "ppl": math.exp(min(self.nll / tokens, 50.0)),
            "lr": lr,
            "tokens_per_s": self.tokens / max(now - self.window_start - self.window_validation, 1e-9),
            "elapsed": now - self.origin,
        }
        self._open_window(now)
        return record
