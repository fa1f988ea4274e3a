"""MetricsLog: whole JSON lines, and a partial last line (a kill mid-write) dropped when the log is opened."""

from __future__ import annotations

import json
from pathlib import Path

from nmt.train.metrics_log import MetricsLog, drop_partial_last_line


def test_records_are_appended_as_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write({"kind": "train", "update": 1, "loss": 2.5})
    with MetricsLog(path) as log:
        log.write({"kind": "valid", "update": 1, "bleu": 3.0})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"kind": "train", "update": 1, "loss": 2.5}, {"kind": "valid", "update": 1, "bleu": 3.0}]


def test_a_disabled_log_writes_nothing(tmp_path: Path) -> None:
    with MetricsLog(tmp_path / "metrics.jsonl", enabled=False) as log:
        log.write({"kind": "train", "update": 1})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_opening_drops_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "update": 1}\n{"kind": "train", "upd')
    with MetricsLog(path) as log:
        log.write({"kind": "train", "update": 2})
    assert path.read_text() == '{"kind": "train", "update": 1}\n{"kind": "train", "update": 2}\n'


def test_drop_partial_last_line_across_blocks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("nmt.train.metrics_log._BLOCK", 4)
    path = tmp_path / "m"
    for text, kept, cut in (("", "", False), ("a\n", "a\n", False), ("abc", "", True),
                            ("first line\nsecond, cut off", "first line\n", True), ("x\ny\n", "x\ny\n", False)):
        path.write_text(text)
        assert drop_partial_last_line(path) is cut
        assert path.read_text() == kept
