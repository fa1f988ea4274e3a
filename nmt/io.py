"""File helpers shared by every command: strict text reading and atomic writes.

Reading names the file and line of undecodable bytes; writing goes to a
temporary name in the same directory and is renamed into place, so an
interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import select
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from nmt.errors import NmtError


def check_readable(path: Path, stream_ok: bool = False) -> Path:
    """Fail early, in one line, on a path that is missing, a directory or empty.

    A pipe can be read only once, so it is refused unless the caller reads it in one pass
    (`stream_ok`); readers that count lines first would see an empty second pass.
    """
    path = Path(path)
    if not path.exists():
        raise NmtError(f"{path}: no such file")
    if path.is_dir():
        raise NmtError(f"{path}: is a directory, expected a file")
    if is_stream(path):
        if not stream_ok:
            raise NmtError(f"{path}: is a pipe or device, which is read more than once here; write it to a file first")
    elif path.stat().st_size == 0:
        raise NmtError(f"{path}: file is empty")
    return path


def is_stream(path: Path) -> bool:
    """A pipe or character device (`-i /dev/stdin`, a FIFO): readable once, of unknown length."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_lines(path: Path, errors: str = "strict") -> Iterator[str]:
    """Yield the lines of a UTF-8 text file (plain or .gz) without their newline.

    With errors="strict", undecodable bytes raise an NmtError naming the line;
    errors="replace" substitutes U+FFFD instead.
    """
    path = check_readable(Path(path))
    try:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                yield decode_line(raw, number, str(path), errors).rstrip("\r\n")
    except (gzip.BadGzipFile, EOFError) as exc:
        raise NmtError(f"{path}: not a valid gzip file ({exc})") from None


def decode_line(raw: bytes, number: int, name: str, errors: str = "strict", hint: str = "") -> str:
    """Decode one line of UTF-8; an undecodable one is an NmtError naming the file and line."""
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise NmtError(f"{name}: line {number} is not valid UTF-8 (byte {exc.start}){hint}") from None


def count_lines(path: Path) -> int:
    """Count lines quickly (bytes only), for progress bars and alignment checks."""
    path = check_readable(Path(path))
    count = 0
    with _open_binary(path) as handle:
        last = b"\n"
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def ensure_writable_dir(directory: Path) -> None:
    """Create `directory` if needed; fail in one line when it cannot be written."""
    if not directory.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NmtError(f"{directory}: cannot create directory ({exc.strerror})") from None
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise NmtError(f"{directory}: directory is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Give a temporary path beside `path`; rename it onto `path` only on success."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Give a temporary directory beside `path`; move it onto `path` only on success."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise NmtError(f"{path}: already exists (use --overwrite to replace it)")
    ensure_writable_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class LineStream:
    """The lines of a byte stream (stdin, a pipe, a file), decoded as UTF-8, without newline or CR.

    `waiting()` tells whether more input is already there, so a consumer can batch what
    has arrived and still answer an interactive user, or a pipe that stays open, line by line.
    """

    def __init__(self, stream: IO[bytes], errors: str = "strict", name: str = "input") -> None:
        if errors not in ("strict", "replace"):
            raise NmtError(f"--errors must be strict or replace, got {errors!r}")
        self.stream, self.errors, self.name = stream, errors, name
        self._more = True

    def __iter__(self) -> Iterator[str]:
        for number, (raw, more_waiting) in enumerate(_raw_lines(self.stream), start=1):
            self._more = more_waiting
            yield decode_line(raw, number, self.name, self.errors, hint="; use --errors replace to continue").rstrip("\r")

    def waiting(self) -> bool:
        return self._more


def chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of at most `size` lines; a `LineStream` is also cut wherever its input pauses."""
    waiting = getattr(lines, "waiting", None)
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= size or (waiting is not None and not waiting()):
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _raw_lines(stream: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Lines without their newline, each with whether more input is already waiting."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # an in-memory stream: everything is there
        lines = stream.read().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for index, line in enumerate(lines):
            yield line, index + 1 < len(lines)
        return
    pending = b""
    while True:
        block = os.read(fd, 1 << 16)
        if not block:
            if pending:
                yield pending, False
            return
        lines = (pending + block).split(b"\n")
        pending = lines.pop()  # an incomplete last line waits for the next block
        for index, line in enumerate(lines):
            last = index + 1 == len(lines)
            yield line, not last or bool(select.select([fd], [], [], 0)[0])
