"""Pictures: the HTML page without matplotlib, PNG files, `nmt attention` and `nmt plot` on a real run."""

from __future__ import annotations

import html
import json
import shutil
import struct
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from nmt.attention import AttentionMap
from nmt.errors import NmtError
from nmt.plot import attention_html, figure_class, read_metrics, run_labels, write_attention
from nmt.train import Trainer
from tests.test_attention import TRANSFORMER, make_translator
from tests.test_train import make_config

runner = CliRunner()
VOID = {"meta", "br", "img", "link", "input", "hr"}


class Page(HTMLParser):
    """Checks that tags nest properly and collects what the page refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.count: dict[str, int] = {}
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.count[tag] = self.count.get(tag, 0) + 1
        self.refs += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open.pop() == tag


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.open == []
    return page


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def make_map(line: int, layers: int = 2, heads: int | None = 3) -> AttentionMap:
    source, target = ["▁a", "▁<b>", "</s>"], ["▁ein", "&", "</s>"]
    weights = torch.softmax(torch.randn(layers, heads or 1, len(target), len(source)), dim=-1)
    return AttentionMap(line, "a <b>", "ein &", source, target, weights.mean(1), weights if heads else None)


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError


def test_html_page_without_matplotlib(no_matplotlib: None, tmp_path: Path) -> None:
    with pytest.raises(NmtError, match=r"^matplotlib is not installed: pip install 'nmt\[plot\]'$"):
        figure_class()
    with pytest.raises(NmtError, match="matplotlib is not installed"):
        write_attention([make_map(1)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    files = write_attention([make_map(1), make_map(4, heads=None)], tmp_path / "out", png=False)
    assert files == [tmp_path / "out" / "index.html"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.html"]
    page = parse(files[0])
    assert page.count["section"] == 2
    assert page.count["table"] == 2 * (1 + 3) + 2  # per layer: average and 3 heads; then 2 layers
    assert page.count["td"] == (8 + 2) * 9  # 3 x 3 cells per map
    assert all(ref.startswith("#line-") for ref in page.refs)  # nothing outside the page
    assert "script" not in page.count
    text = files[0].read_text(encoding="utf-8")
    assert "▁&lt;b&gt;" in text and "ein &amp;" in text  # pieces and sentences are escaped


def test_html_cells_show_the_weights(tmp_path: Path) -> None:
    amap = make_map(1, layers=1, heads=None)
    attention_html([amap], tmp_path / "page.html")
    text = (tmp_path / "page.html").read_text(encoding="utf-8")
    for row, piece in zip(amap.weights[0].tolist(), amap.target, strict=True):
        for weight, source in zip(row, amap.source, strict=True):
            cell = f'rgba(8,69,148,{weight:.3f})" title="{html.escape(piece)} ← {html.escape(source)}: {weight:.3f}"'
            assert cell in text


def test_pngs_and_overwrite_rules(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    files = write_attention([make_map(3), make_map(12, layers=1, heads=None)], out)
    assert [f.name for f in files] == ["index.html", "line_0003.png", "line_0012.png"]
    wide, tall = png_size(files[1])
    narrow, short = png_size(files[2])
    assert wide > narrow and tall > short  # a panel per layer and head
    with pytest.raises(NmtError, match="already exists"):
        write_attention([make_map(1)], out)
    write_attention([make_map(1)], out, png=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(NmtError, match="other: is not a folder written by nmt attention"):
        write_attention([make_map(1)], tmp_path / "other", overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(NmtError, match=r"out: holds files that nmt attention does not write \(notes.txt\)"):
        write_attention([make_map(1)], out, png=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_attention_command(joint_spm: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    translator = make_translator(joint_spm, TRANSFORMER)
    translator.checkpoint.save(tmp_path / "model.pt")
    (tmp_path / "in.txt").write_text("a man runs\n\nthe girl plays\n", encoding="utf-8")
    args = ["attention", "-m", str(tmp_path / "model.pt"), "-i", str(tmp_path / "in.txt"), "--device", "cpu",
            "--threads", "1"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "att"), "--heads", "--beam", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == ["index.html", "line_0001.png", "line_0003.png"]
    assert parse(tmp_path / "att" / "index.html").count["table"] == 2 * 2 * (1 + 4)
    png_size(tmp_path / "att" / "line_0003.png")


def test_attention_command_errors(joint_spm: Path, tmp_path: Path, no_matplotlib: None) -> None:
    from tests.test_attention import RNN

    make_translator(joint_spm, RNN).checkpoint.save(tmp_path / "rnn.pt")
    (tmp_path / "in.txt").write_text("a man runs\n", encoding="utf-8")
    args = ["attention", "-m", str(tmp_path / "rnn.pt"), "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "att"),
            "--device", "cpu", "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "matplotlib is not installed: pip install 'nmt[plot]' (or --no-png" in result.output
    result = runner.invoke(app, [*args, "--no-png", "--heads"])
    assert result.exit_code == 1 and "--heads needs a Transformer" in result.output
    result = runner.invoke(app, [*args, "--no-png"])
    assert result.exit_code == 0, result.output
    assert parse(tmp_path / "att" / "index.html").count["table"] == 1


def test_plot_command_on_a_real_run(toy_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    Trainer(make_config(toy_data, run, "train.max_updates=4", "train.valid_every=2",
                        "train.valid_max_sentences=4")).train()
    metrics = read_metrics(run)
    assert metrics.series[("train", "loss")][0] == [1, 2, 3, 4]
    assert metrics.series[("valid", "bleu")][0] == [2, 4]
    assert all(lr > 0 for lr in metrics.series[("train", "lr")][1])
    other = tmp_path / "other" / "run"
    other.mkdir(parents=True)
    shutil.copy(run / "metrics.jsonl", other / "metrics.jsonl")
    result = runner.invoke(app, ["plot", str(run), str(other), "-o", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "curves.png") == (1100, 750)
    assert "4 updates" in result.output and "best BLEU" in result.output
    assert run_labels([metrics, read_metrics(other)]) == [str(run), str(other)]  # same names: whole paths


def test_metrics_reading(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "update": u, "loss": float(u), "lr": 0.1} for u in (1, 2, 3)]
    records += [{"kind": "train", "update": 3, "loss": 30.0, "lr": 0.1}]  # resumed from update 2: logged again
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = read_metrics(log)
    assert metrics.series[("train", "loss")] == ([1, 2, 3], [1.0, 2.0, 30.0])
    assert metrics.series[("valid", "bleu")] == ([], [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NmtError, match="empty: no metrics.jsonl"):
        read_metrics(tmp_path / "empty")
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)))  # once "line 1 is not valid UTF-8"
    with pytest.raises(NmtError, match=r"best.pt: a checkpoint, not a metrics file: plot its run directory \("):
        read_metrics(tmp_path / "best.pt")
    log.write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(NmtError, match="metrics.jsonl: line 2 is not a metrics record"):
        read_metrics(log)
    log.write_text(json.dumps(records[0]) + "\n{oops\n" + json.dumps(records[1]) + "\n")
    with pytest.raises(NmtError, match="metrics.jsonl: line 2 is not a metrics record"):  # in the middle
        read_metrics(log)


def test_a_partial_last_line_is_left_out(tmp_path: Path) -> None:
    """A training killed while writing a record leaves its last line cut off; the run still plots."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"kind": "train", "update": 1, "loss": 5.0}\n{"kind": "train", "update": 2, "lo')
    assert read_metrics(log).series[("train", "loss")] == ([1], [5.0])
    log.write_text('{"kind": "train", "upd')
    assert read_metrics(log).series[("train", "loss")] == ([], [])
