"""How library code reports progress without knowing who displays it.

Long-running library functions take a `Reporter`; the command line passes one
that draws rich progress bars, tests and the Python API pass `SILENT`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Advance = Callable[[float], None]


class Reporter(Protocol):
    def task(self, description: str, total: float | None = None, unit: str = "lines") -> Advance:
        """Start a task; the returned function advances it by the given amount."""
        ...


class _Silent:
    def task(self, description: str, total: float | None = None, unit: str = "lines") -> Advance:
        return lambda amount: None


SILENT: Reporter = _Silent()
