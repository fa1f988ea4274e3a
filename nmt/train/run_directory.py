"""A training run's directory: checkpoint names, rotation, the stored config, and the lock.

    RUN_DIR/update_00001200.pt   one checkpoint per saved update (the last `keep_last` kept)
    RUN_DIR/best.pt              the best validation so far
    RUN_DIR/final.pt             the model to use: weights and length penalty chosen on valid (nmt.train.selection)
    RUN_DIR/selection.json       how final.pt was chosen: every candidate's valid score
    RUN_DIR/config.toml          the resolved config of the latest checkpoint
    RUN_DIR/metrics.jsonl        every log line and validation (nmt.train.metrics_log)
    RUN_DIR/tensorboard/         the same numbers for TensorBoard, when it is installed
    RUN_DIR/train.lock           who trains here now: pid, host and start time

One training at a time: the lock is an OS-level `flock`, so a crashed process holds it no
longer, and a second training on the same directory fails at once saying who holds it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nmt.errors import NmtError
from nmt.io import atomic_path, ensure_writable_dir

BEST = "best.pt"
FINAL = "final.pt"
SELECTION = "selection.json"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
LOCK = "train.lock"
_UPDATE = re.compile(r"update_(\d+)\.pt")


def update_checkpoint_name(update: int) -> str:
    """`update_00001200.pt`: zero-padded, so names sort like the updates they hold."""
    return f"update_{update:08d}.pt"


def update_checkpoints(run_dir: Path) -> list[Path]:
    """The update checkpoints of a run directory, oldest (lowest update) first."""
    found = [(int(match[1]), path) for path in Path(run_dir).glob("update_*.pt")
             if (match := _UPDATE.fullmatch(path.name)) and path.is_file()]
    return [path for _, path in sorted(found)]


def last_checkpoints(run_dir: Path, n: int) -> list[Path]:
    """The `n` update checkpoints with the highest updates (fewer if the run has fewer), oldest first."""
    if n < 1:
        raise NmtError(f"the number of last checkpoints must be at least 1, got {n}")
    return update_checkpoints(run_dir)[-n:]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The update checkpoint with the highest update number in a run directory."""
    found = update_checkpoints(run_dir)
    return found[-1] if found else None


class RunDirectory:
    """Where one training run keeps its files; every name in it is decided here."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def best_path(self) -> Path:
        return self.path / BEST

    @property
    def final_path(self) -> Path:
        return self.path / FINAL

    @property
    def selection_path(self) -> Path:
        return self.path / SELECTION

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def log_paths(self) -> tuple[Path, Path]:
        """metrics.jsonl and the TensorBoard folder."""
        return self.path / METRICS, self.path / TENSORBOARD

    def update_path(self, update: int) -> Path:
        return self.path / update_checkpoint_name(update)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.path)

    def check_available(self, resume: bool) -> None:
        """Refuse a directory another training holds, and, for a new run, one holding another run's checkpoints
        (rotation would delete them)."""
        if (self.path / LOCK).exists():
            with self.lock():
                pass
        if not resume and (self.latest() is not None or self.best_path.exists()):
            raise NmtError(f"{self.path} already holds checkpoints: use --resume to continue or another --run-dir")

    def save(self, data: bytes, update: int, best: bool, keep_last: int, config_toml: str) -> Path:
        """Write update_N.pt (and best.pt), keep the last `keep_last`, then config.toml: it always
        describes a checkpoint on disk, never settings that none was saved with."""
        path = self.update_path(update)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        if best:
            with atomic_path(self.best_path) as tmp:
                tmp.write_bytes(data)
        for old in update_checkpoints(self.path)[:-keep_last]:
            old.unlink()
        with atomic_path(self.config_path) as tmp:
            tmp.write_text(config_toml, encoding="utf-8")
        return path

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold RUN_DIR/train.lock until the block ends (or the process dies); fail at once if another holds it."""
        ensure_writable_dir(self.path)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NmtError(f"{self.path}: another training is using this run directory ({_holder(fd)}); "
                               "wait for it to end or use another --run-dir") from None
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """What the lock file says about the process holding it."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: it is still starting"
