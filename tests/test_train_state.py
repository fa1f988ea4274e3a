"""Run state: progress saved in checkpoints, the limits checked before every update, --reset values, stop signals."""

from __future__ import annotations

import os
import signal

import pytest

from nmt.config import TrainConfig
from nmt.errors import NmtError
from nmt.optim import Improvement
from nmt.train.signals import StopSignals, stop_reason
from nmt.train.state import Progress, check_reset, limit_reached


def test_progress_state_is_flat_and_reads_earlier_checkpoints() -> None:
    progress = Progress(update=7, epoch=2, position=3, elapsed=9.5, target_tokens=700, validation_seconds=1.5,
                        improvement=Improvement(best=3.0, bad_validations=2))
    state = progress.state_dict()
    assert state == {"update": 7, "epoch": 2, "position": 3, "elapsed": 9.5, "target_tokens": 700,
                     "validation_seconds": 1.5, "best": 3.0, "bad_validations": 2}
    assert Progress.from_state_dict(state) == progress and progress.best == 3.0
    earlier = {k: v for k, v in state.items() if k != "validation_seconds"}  # checkpoints of earlier versions
    assert Progress.from_state_dict(earlier).validation_seconds == 0.0
    assert Progress.from_state_dict(state, reset_best=True).improvement == Improvement()


def test_a_finished_epoch_is_skipped() -> None:
    progress = Progress(update=9, epoch=2, position=5)
    progress.skip_finished_epoch(6)
    assert (progress.epoch, progress.position) == (2, 5)
    progress.skip_finished_epoch(5)  # saved by an earlier version after the epoch's last update
    assert (progress.epoch, progress.position, progress.update) == (3, 0, 9)


@pytest.mark.parametrize(("limits", "update", "epoch", "out_of_time", "reason"), [
    ({}, 10**6, 10**3, False, ""),
    ({"max_updates": 5}, 4, 1, False, ""),
    ({"max_updates": 5}, 5, 1, False, "max_updates"),
    ({"max_updates": 5}, 9, 1, False, "max_updates"),  # a run resumed past its limit does no update
    ({"max_epochs": 2}, 50, 2, False, ""),
    ({"max_epochs": 2}, 50, 3, False, "max_epochs"),
    ({"max_minutes": 1.0}, 1, 1, True, "max_minutes"),
    ({"max_updates": 5, "max_epochs": 1}, 5, 2, True, "max_updates"),
])
def test_limits(limits: dict, update: int, epoch: int, out_of_time: bool, reason: str) -> None:
    assert limit_reached(TrainConfig(**limits), Progress(update=update, epoch=epoch), out_of_time) == reason


def test_reset_values() -> None:
    check_reset(("optimizer", "best"), resume=True)
    check_reset((), resume=False)
    with pytest.raises(NmtError, match="unknown --reset value.s. everything; choose from optimizer, scheduler, best"):
        check_reset(("everything",), resume=True)
    with pytest.raises(NmtError, match="--reset only makes sense with --resume"):
        check_reset(("best",), resume=False)


@pytest.mark.parametrize(("number", "reason", "message"), [
    (signal.SIGINT, "interrupted", "interrupt: saving a checkpoint after this update (Ctrl-C again to abort)"),
    (signal.SIGTERM, "terminated", "SIGTERM: saving a checkpoint after this update (a second SIGTERM aborts)"),
])
def test_the_first_stop_signal_is_recorded_and_a_second_aborts(number: int, reason: str, message: str) -> None:
    messages: list[str] = []
    before = signal.getsignal(number)
    with StopSignals(messages.append) as signals:
        assert signals.received == 0
        os.kill(os.getpid(), number)
        assert signals.received == number and stop_reason(signals.received) == reason
        assert messages == [message]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), number)
    assert signal.getsignal(number) is before
    assert stop_reason(0) == ""
