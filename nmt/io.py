"""File helpers shared by every command: strict text reading and atomic writes.

Reading names the file and line of undecodable bytes; writing goes to a
temporary name in the same directory and is renamed into place, so an
interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
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


def check_readable(path: Path, stream_ok: bool = False, empty_ok: bool = False) -> Path:
    """Fail early, in one line, on a path that is missing, a directory or (unless `empty_ok`) empty.

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
    elif path.stat().st_size == 0 and not empty_ok:
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
    with _gzip_errors(path), _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            yield decode_line(raw, number, str(path), errors).rstrip("\r\n")


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
    with _gzip_errors(path), _open_binary(path) as handle:
        last = b"\n"
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


@contextlib.contextmanager
def _gzip_errors(path: Path) -> Iterator[None]:
    """A damaged .gz is one line naming the file (EOFError would reach the CLI as a bare "Aborted!")."""
    try:
        yield
    except EOFError:
        raise NmtError(f"{path}: truncated gzip file (it ends before its compressed data does)") from None
    except gzip.BadGzipFile as exc:
        raise NmtError(f"{path}: not a valid gzip file ({exc})") from None


def ensure_writable_dir(directory: Path) -> None:
    """Create `directory` if needed; fail in one line when it cannot be written."""
    if not directory.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NmtError(f"{directory}: cannot create directory ({exc.strerror})") from None
    if not directory.is_dir():
        raise NmtError(f"{directory}: is not a directory")
    if not os.access(directory, os.W_OK):
        raise NmtError(f"{directory}: directory is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Give a temporary path beside `path`; rename it onto `path` only on success.

    Only a regular file (or a new one) is replaced so: a FIFO, a device or a terminal is
    written in place (a rename would swap it for a file its reader never sees), and a
    symbolic link is followed, so that its target is replaced and the link stays. A full
    disk or a read-only file system names the file. Temporaries left by killed runs are
    removed (their names carry the writer's process id).
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.is_dir():
        raise NmtError(f"{path}: is a directory, expected a file name")
    if path.exists() and not path.is_file():
        with _naming_write_errors(path):
            yield path
        return
    ensure_writable_dir(path.parent)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
    try:
        with _naming_write_errors(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)


@contextlib.contextmanager
def _naming_write_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:
            raise NmtError(f"{path}: cannot write ({exc.strerror})") from None
        raise


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `.NAME.PID.*.tmp` files or folders beside `path` whose writer no longer runs (killed by SIGKILL, say)."""
    for candidate in path.parent.glob(f".{_glob_escape(path.name)}.*.tmp"):
        pid = candidate.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_output_dir(path: Path, overwrite: bool = False) -> Path:
    """The checks `atomic_dir` makes, for commands that should fail before their long work, not after."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise NmtError(f"{path}: already exists (use --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise NmtError(f"{path}: is a file, expected a directory")
    ensure_writable_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Give a temporary directory beside `path`; move it onto `path` only on success
    (stale ones go, as in atomic_path)."""
    path = check_output_dir(path, overwrite)
    _remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
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
            yield decode_line(raw, number, self.name, self.errors,
                              hint="; use --errors replace to continue").rstrip("\r")

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
