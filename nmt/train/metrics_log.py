"""RUN_DIR/metrics.jsonl (one JSON record a line) and TensorBoard scalars when `tensorboard` is installed.

A process killed while writing leaves a partial last line; opening the log drops it, so a
resumed run appends whole records and `nmt plot` reads the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

_BLOCK = 1 << 16


class MetricsLog:
    """Appends records; a log that is not `enabled` (ranks other than 0) writes nothing."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.tensorboard_dir = tensorboard_dir
        self.enabled = enabled
        self._handle: IO[str] | None = None
        self._board: Any = None

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            if self.path.exists():
                drop_partial_last_line(self.path)
            self._handle = open(self.path, "a", encoding="utf-8")
            self._board = _summary_writer(self.tensorboard_dir) if self.tensorboard_dir is not None else None
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._board is not None:
            self._board.close()
            self._board = None

    def write(self, record: dict[str, Any]) -> None:
        """One line, flushed at once (a crash loses no earlier record); numbers also go to TensorBoard."""
        if self._handle is None:
            return
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._board is not None:
            for key, value in record.items():
                if key not in ("kind", "update", "epoch") and isinstance(value, (int, float)):
                    self._board.add_scalar(f"{record['kind']}/{key}", value, record["update"])


def drop_partial_last_line(path: Path) -> bool:
    """Cut the file after its last newline; returns whether there was anything to cut."""
    with open(path, "rb+") as handle:
        size = end = handle.seek(0, os.SEEK_END)
        keep = 0
        while end > 0:
            start = max(0, end - _BLOCK)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep == size:
            return False
        handle.truncate(keep)
        return True


def _summary_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))
