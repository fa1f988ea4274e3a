"""nmt.io: atomic files and folders (regular files only), stale temporaries, write errors that name the file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nmt.errors import NmtError
from nmt.io import OutputFolder, atomic_dir, atomic_path, check_output_dir, ensure_writable_dir, read_json

DEAD_PID = 2**22 + 777  # above Linux's pid limit: no process has it
PAGES = OutputFolder("nmt pages", "index.html", lambda name: name in ("index.html", "page.png"))


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
    with atomic_dir(tmp_path / "att", kind=PAGES) as tmp:
        (tmp / "index.html").write_text("<html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att"]
    with pytest.raises(NmtError, match="att: already exists"):
        check_output_dir(tmp_path / "att", kind=PAGES)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NmtError, match="file: is a file, expected a directory"):
        check_output_dir(tmp_path / "file", overwrite=True, kind=PAGES)


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


def test_overwrite_replaces_only_an_earlier_folder_of_the_same_kind(tmp_path: Path) -> None:
    ours, notes = tmp_path / "ours", tmp_path / "notes"
    with atomic_dir(ours, kind=PAGES) as tmp:
        (tmp / "index.html").write_text("old")
    with atomic_dir(ours, overwrite=True, kind=PAGES) as tmp:
        (tmp / "index.html").write_text("new")
    assert (ours / "index.html").read_text() == "new"
    notes.mkdir()
    (notes / "letter.txt").write_text("precious")
    with pytest.raises(NmtError, match=r"notes: is not a folder written by nmt pages \(no index.html of its own\); "
                                       r"refusing to replace it$"):
        check_output_dir(notes, overwrite=True, kind=PAGES)
    (notes / "index.html").write_text("mine too")
    with pytest.raises(NmtError, match=r"notes: holds files that nmt pages does not write \(letter.txt\); refusing"):
        check_output_dir(notes, overwrite=True, kind=PAGES)
    assert (notes / "letter.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()  # nothing to lose
    assert check_output_dir(tmp_path / "empty", overwrite=True, kind=PAGES) == tmp_path / "empty"


def test_overwrite_never_replaces_the_working_or_home_directory_or_what_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    (work / "sub").mkdir(parents=True)
    home.mkdir()
    monkeypatch.chdir(work / "sub")
    monkeypatch.setenv("HOME", str(home))
    for given, reason in ((Path("."), "is the current directory"), (Path(".."), "holds the current directory"),
                          (home, "is the home directory"), (tmp_path, "holds the current directory")):
        with pytest.raises(NmtError, match=f"^{given}: {reason}; refusing to replace it"):
            check_output_dir(given, overwrite=True, kind=PAGES)
    (home / "run").mkdir()
    (home / "run" / "index.html").write_text("looks like ours")
    with pytest.raises(NmtError, match=r"run: holds index.html, which this command reads; refusing"):
        check_output_dir(home / "run", overwrite=True, kind=PAGES, reading=[home / "run" / "index.html"])
    with pytest.raises(NmtError, match=r"^\.: is the current directory"):  # said at once, even without --overwrite
        check_output_dir(Path("."), kind=PAGES)


def test_folder_write_errors_name_the_output_not_the_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(NmtError, match=f"^{out}/model.bin: cannot write \\(Permission denied\\)$"), \
            atomic_dir(out, kind=PAGES) as tmp:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "model.bin"))
    with pytest.raises(NmtError, match=f"^{out}: cannot write \\(No space left on device\\)$"), \
            atomic_dir(out, kind=PAGES):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_read_json_refuses_what_is_not_a_small_regular_utf8_file(tmp_path: Path) -> None:
    cases = {
        "nested": ("[" * 100_000 + "]" * 100_000).encode(), "latin": '{"a": "\xe9"}'.encode("latin-1"),
        "digits": b"1" * 5000, "broken": b"{", "large": b" " * 2000,
    }
    reasons = {"nested": r"not valid JSON \(nested too deeply\)", "latin": r"not valid UTF-8 \(byte 7\)",
               "digits": "not valid JSON", "broken": "not valid JSON", "large": "2000 bytes, more than the 1000"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(NmtError, match=f"^{tmp_path / name}: {reasons[name]}"):
            read_json(tmp_path / name, max_bytes=1000 if name == "large" else 1 << 20)
    os.mkfifo(tmp_path / "fifo")  # refused at once, never waited on
    with pytest.raises(NmtError, match="fifo: not a regular file$"):
        read_json(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "broken")
    with pytest.raises(NmtError, match=r"link: cannot read \(is a symbolic link\)$"):
        read_json(tmp_path / "link", follow_symlinks=False)
    (tmp_path / "good").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "good") == {"a": [1, 2]}


def test_regular_only_writes_never_go_through_a_link_or_into_a_pipe(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(NmtError, match=f"{name}: not a regular file; left as it is"), \
                atomic_path(tmp_path / name, regular_only=True):
            pass
    assert (tmp_path / "target").read_text() == "keep" and (tmp_path / "link").is_symlink()
    with atomic_path(tmp_path / "cache", regular_only=True) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "cache").read_text() == "new"
