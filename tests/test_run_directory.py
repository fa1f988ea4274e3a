"""RunDirectory: checkpoint names, latest / last N, rotation, the stored config, and the run lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nmt.errors import NmtError
from nmt.train import RunDirectory, last_checkpoints, latest_checkpoint, update_checkpoint_name
from nmt.train.run_directory import update_checkpoints


def touch(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"x")


def test_names_sort_by_update_and_strangers_are_ignored(tmp_path: Path) -> None:
    assert update_checkpoint_name(1200) == "update_00001200.pt"
    touch(tmp_path, "update_00000010.pt", "update_00000002.pt", "update_123456789.pt", "update_x.pt",
          ".update_00000099.pt.abc.tmp", "update_00000005.pt.bak", "best.pt")
    (tmp_path / "update_00000007.pt").mkdir()
    names = [p.name for p in update_checkpoints(tmp_path)]
    assert names == ["update_00000002.pt", "update_00000010.pt", "update_123456789.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "update_123456789.pt"
    assert last_checkpoints(tmp_path, 2) == [tmp_path / "update_00000010.pt", tmp_path / "update_123456789.pt"]
    assert last_checkpoints(tmp_path, 10) == [tmp_path / n for n in names]
    assert latest_checkpoint(tmp_path / "missing") is None and last_checkpoints(tmp_path / "missing", 3) == []
    with pytest.raises(NmtError, match="at least 1, got 0"):
        last_checkpoints(tmp_path, 0)


def test_save_rotates_writes_best_and_then_the_config(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    for update in (1, 2, 3):
        run.save(f"state {update}".encode(), update, best=update == 2, keep_last=2, config_toml=f"# config {update}\n")
    assert [p.name for p in update_checkpoints(run.path)] == ["update_00000002.pt", "update_00000003.pt"]
    assert run.best_path.read_bytes() == b"state 2"
    assert run.config_path.read_text() == "# config 3\n"
    names = sorted(p.name for p in run.path.iterdir())
    assert names == ["best.pt", "config.toml", "update_00000002.pt", "update_00000003.pt"]


def test_a_new_run_refuses_another_runs_checkpoints(tmp_path: Path) -> None:
    RunDirectory(tmp_path / "missing").check_available(resume=False)
    touch(tmp_path / "a", "update_00000004.pt")
    touch(tmp_path / "b", "best.pt")
    for name in ("a", "b"):
        with pytest.raises(NmtError, match=f"^{tmp_path / name} already holds checkpoints: use --resume"):
            RunDirectory(tmp_path / name).check_available(resume=False)
        RunDirectory(tmp_path / name).check_available(resume=True)
    touch(tmp_path / "c", "metrics.jsonl", "config.toml")
    RunDirectory(tmp_path / "c").check_available(resume=False)


def test_the_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    with run.lock():
        pattern = (rf"^{run.path}: another training is using this run directory \(pid {os.getpid()} on "
                   rf"{socket.gethostname()}, started \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d.*\); wait for it")
        with pytest.raises(NmtError, match=pattern):
            with run.lock():
                pass
        with pytest.raises(NmtError, match="another training is using"):
            run.check_available(resume=True)
    with run.lock():  # released at the end of the block
        pass
    run.check_available(resume=False)


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nmt.train.run_directory import RunDirectory\n"
         f"with RunDirectory({str(run.path)!r}).lock():\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(NmtError, match=f"pid {holder.pid} "):
            with run.lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with run.lock():  # the process is gone, and with it its lock
        pass
