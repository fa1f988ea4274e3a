"""TrainMeter: log-line averages, and rates that leave validation time out."""

from __future__ import annotations

import math

import pytest

from nmt.train.meter import TrainMeter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rates_exclude_validation_and_windows_restart() -> None:
    clock = Clock()
    meter = TrainMeter(elapsed=30.0, validation_seconds=5.0, clock=clock)
    meter.add(loss=40.0, nll=20.0, tokens=10)
    meter.add(loss=60.0, nll=30.0, tokens=10)
    clock.now += 4.0
    meter.exclude(6.0)  # a validation of 6 s inside this 10 s window
    clock.now += 6.0
    record = meter.record(update=7, epoch=2, lr=0.5)
    assert record == {"kind": "train", "update": 7, "epoch": 2, "loss": 5.0, "nll": 2.5,
                      "ppl": pytest.approx(math.exp(2.5)), "lr": 0.5, "tokens_per_s": 5.0, "elapsed": 40.0}
    assert meter.elapsed() == 40.0 and meter.validation_seconds == 11.0 and meter.training_seconds() == 29.0
    meter.add(loss=1.0, nll=1.0, tokens=8)
    clock.now += 2.0
    assert meter.record(update=8, epoch=2, lr=0.5)["tokens_per_s"] == 4.0  # the validation belonged to the last window
