"""nmt.io: atomic files and folders (regular files only), stale temporaries, write errors that name the file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nmt.errors import NmtError
from nmt.io import atomic_dir, atomic_path, check_output_dir, ensure_writable_dir

DEAD_PID = 2**22 + 777  # above Linux's pid limit: no process has it


def test_atomic_path_renames_into_place_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(out) as tmp:
        assert tmp.name.startswith(f".out.txt.{os.getpid()}.") and not out.exists()
        tmp.write_text("done")
    assert out.read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_stale_temporaries_of_dead_writers_go_live_ones_stay(tmp_path: Path) -> None:
    stale_file = tmp_path / f".out.txt.{DEAD_PID}.x1.tmp"
    stale_dir = tmp_path / f".out.txt.{DEAD_PID}.x2.tmp"
    live = tmp_path / f".out.txt.{os.getpid()}.x3.tmp"  # another writer, still running
    other = tmp_path / f".other.txt.{DEAD_PID}.x4.tmp"  # another target's
    stale_file.write_text("killed")
    stale_dir.mkdir()
    (stale_dir / "part").write_text("killed")
    live.write_text("running")
    other.write_text("not ours")
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.txt", live.name, other.name])


def test_atomic_dir_cleans_stale_folders_too(tmp_path: Path) -> None:
    stale = tmp_path / f".att.{DEAD_PID}.y.tmp"
    stale.mkdir()
    with atomic_dir(tmp_path / "att") as tmp:
        (tmp / "index.html").write_text("<html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att"]
    with pytest.raises(NmtError, match="att: already exists"):
        check_output_dir(tmp_path / "att")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NmtError, match="file: is a file, expected a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_a_full_disk_names_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with pytest.raises(NmtError, match=r"out.txt: cannot write \(No space left on device\)$"), atomic_path(out):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PermissionError), atomic_path(out):  # other errors pass unchanged
        raise PermissionError(errno.EACCES, "denied")


def test_directories_are_named_for_what_they_are(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NmtError, match="file: is not a directory$"):
        ensure_writable_dir(tmp_path / "file")
    with pytest.raises(NmtError, match="is a directory, expected a file name"), atomic_path(tmp_path):
        pass
