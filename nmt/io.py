"""File helpers shared by every command: strict text reading and atomic writes.

Reading names the file and line of undecodable bytes; writing goes to a
temporary name in the same directory and is renamed into place, so an
interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import select
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


def read_json(path: Path, max_bytes: int = 1 << 20, follow_symlinks: bool = True) -> Any:
    """A small JSON file (a manifest, a cache), read only if it is a regular file: a FIFO or a device is
    refused, never waited on. Anything else wrong (too large, not UTF-8, not JSON, nested too deeply)
    is one NmtError naming the file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW))
    except OSError as exc:
        reason = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise NmtError(f"{path}: cannot read ({reason})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NmtError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise NmtError(f"{path}: {info.st_size} bytes, more than the {max_bytes} expected")
        data = handle.read(max_bytes + 1)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise NmtError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise NmtError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
        raise NmtError(f"{path}: not valid JSON ({exc})") from None


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
def atomic_path(path: Path, regular_only: bool = False) -> Iterator[Path]:
    """Give a temporary path beside `path`; rename it onto `path` only on success.

    Only a regular file (or a new one) is replaced so: a FIFO, a device or a terminal is
    written in place (a rename would swap it for a file its reader never sees), and a
    symbolic link is followed, so that its target is replaced and the link stays. A full
    disk or a read-only file system names the file. Temporaries left by killed runs are
    removed (their names carry the writer's process id). With `regular_only` (a cache), anything but a
    regular file or nothing at `path` is refused instead: nothing is written through a link or into a pipe.
    """
    path = Path(path)
    if regular_only and (path.is_symlink() or (path.exists() and not path.is_file())):
        raise NmtError(f"{path}: not a regular file; left as it is")
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


@dataclass(frozen=True)
class OutputFolder:
    """The kind of folder one command writes, so that --overwrite replaces an earlier one of those and nothing else.

    A folder is that command's when its `marker` file is (`marker_ok` reads it) and every name at its top
    is one the command writes: a folder also holding a checkpoint, notes or another run's files is not.
    """

    command: str  # named in refusals: "nmt export"
    marker: str  # the file that identifies the folder: nmt.json, meta.json, index.html
    names: Callable[[str], bool]  # the top-level names the command writes
    marker_ok: Callable[[Path], bool] = lambda path: path.is_file() and not path.is_symlink()

    def foreign(self, folder: Path) -> str | None:
        """Why `folder` is not one of these (None: it is one, or it is empty)."""
        entries = sorted(entry.name for entry in folder.iterdir())
        if not entries:
            return None
        if self.marker not in entries or not self.marker_ok(folder / self.marker):
            return f"is not a folder written by {self.command} (no {self.marker} of its own)"
        other = [name for name in entries if not self.names(name)]
        if other:
            shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
            return f"holds files that {self.command} does not write ({shown})"
        return None


def _protected(path: Path, reading: Iterable[Path]) -> str | None:
    """Why no command may replace `path` whatever it holds: the current or home directory, one above
    them, or a folder holding a file the command is reading."""
    real = path.resolve()
    for name, place in (("the current directory", Path.cwd()), ("the home directory", Path.home())):
        place = place.resolve()
        if real == place or real in place.parents:
            return f"is {name}" if real == place else f"holds {name}"
    for source in reading:
        source = Path(source).resolve()
        if real == source or real in source.parents:
            return f"holds {source.name}, which this command reads"
    return None


def check_output_dir(path: Path, overwrite: bool = False, *, kind: OutputFolder,
                     reading: Iterable[Path] = ()) -> Path:
    """Refuse, in one line, an output folder that exists unless --overwrite may replace it: only an earlier
    folder of this `kind`, never the current or home directory, one above them, or one holding a file in
    `reading` (the checkpoint being exported). Commands call it before their long work, and atomic_dir
    again before the swap."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        protected = _protected(path, reading)
        if protected:
            raise NmtError(f"{path}: {protected}; refusing to replace it (choose a new folder)")
        if not overwrite:
            raise NmtError(f"{path}: already exists (use --overwrite to replace it)")
        if not path.is_dir():
            raise NmtError(f"{path}: is a file, expected a directory")
        foreign = kind.foreign(path)
        if foreign:
            raise NmtError(f"{path}: {foreign}; refusing to replace it")
    ensure_writable_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False, *, kind: OutputFolder,
               reading: Iterable[Path] = ()) -> Iterator[Path]:
    """Give a temporary directory beside `path`; move it onto `path` only on success (stale ones go, as in
    atomic_path). Write errors inside name `path`, never the hidden temporary folder."""
    reading = list(reading)
    check_output_dir(path, overwrite, kind=kind, reading=reading)
    target = Path(os.path.abspath(path))
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        with _naming_folder_errors(Path(path), tmp):
            yield tmp
            check_output_dir(path, overwrite, kind=kind, reading=reading)  # nothing new appeared meanwhile
            if target.exists() or target.is_symlink():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _naming_folder_errors(path: Path, tmp: Path) -> Iterator[None]:
    """An OSError about a file in the temporary folder, or a full disk, names the file under `path`."""
    try:
        yield
    except OSError as exc:
        name = Path(exc.filename) if isinstance(exc.filename, str) else None
        if name is not None and (name == tmp or tmp in name.parents):
            raise NmtError(f"{path / name.relative_to(tmp)}: cannot write ({exc.strerror or exc})") from None
        if name is None and exc.errno in WRITE_ERRORS:
            raise NmtError(f"{path}: cannot write ({exc.strerror})") from None
        raise


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
