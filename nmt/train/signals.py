"""Stopping on request: SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`, `docker stop`) alike.

The first signal lets the current update finish; the trainer then saves and stops. A second
one aborts at once (KeyboardInterrupt). Outside the main thread signals are left alone.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

STOP_REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}  # the trainer's stop_reason per signal
_MESSAGES = {
    signal.SIGINT: "interrupt: saving a checkpoint after this update (Ctrl-C again to abort)",
    signal.SIGTERM: "SIGTERM: saving a checkpoint after this update (a second SIGTERM aborts)",
}


class StopSignals:
    """While active, records the first stop signal in `received` (0: none yet)."""

    def __init__(self, message: Callable[[str], None]) -> None:
        self.message = message
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        try:
            for number in STOP_REASONS:
                self._previous[number] = signal.signal(number, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = number
        self.message(_MESSAGES[number])


def stop_reason(number: int) -> str:
    """The stop reason for a received signal number (0: none)."""
    return STOP_REASONS.get(number, "")
