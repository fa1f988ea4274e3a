"""`nmt tokenizer` through Typer's runner and as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from nmt import __version__
from nmt.tokenizer import Tokenizer

runner = CliRunner()


def nmt(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `nmt` console script."""
    exe = Path(sys.executable).with_name("nmt")
    env = {k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


def test_help_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "tokenizer" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"nmt {__version__}"
    for command in ("tokenizer",):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output


def test_joint_model_through_runner(corpus_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["tokenizer", str(corpus_dir / "train.en"), str(corpus_dir / "train.de"), "-o", str(tmp_path / "m"),
              "--vocab-size", "300"]
    )
    assert result.exit_code == 0, result.output
    assert "sentences used" in result.output and "1,200" in result.output
    assert Tokenizer.load(tmp_path / "m.model").vocab_size == 300
    assert (tmp_path / "m.vocab").is_file()


def test_auto_vocabulary_size_by_default(corpus_dir: Path, tmp_path: Path) -> None:
    """600 lines per input file are 600 pairs: 2,000 pieces, more than this text makes, so the most it does."""
    result = runner.invoke(app, ["tokenizer", str(corpus_dir / "train.en"), str(corpus_dir / "train.de"),
                                 "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    size = Tokenizer.load(tmp_path / "m.model").vocab_size
    assert "auto: 2,000 for 600 sentence pairs" in result.output and f"{size:,}, the nearest size" in result.output
    bad = runner.invoke(app, ["tokenizer", str(corpus_dir / "train.en"), "-o", str(tmp_path / "n"),
                              "--vocab-size", "x"])
    assert bad.exit_code == 1
    assert bad.stderr.strip() == "error: vocabulary size must be a number of pieces or 'auto', got 'x'"


def test_separate_models_as_subprocess(corpus_dir: Path, tmp_path: Path) -> None:
    result = nmt("tokenizer", str(corpus_dir / "train.en"), str(corpus_dir / "train.de"), "-o", str(tmp_path / "m"),
                 "--vocab-size", "290", "--separate", "--model-type", "unigram")
    assert result.returncode == 0, result.stderr
    src, tgt = Tokenizer.load(tmp_path / "m.src.model"), Tokenizer.load(tmp_path / "m.tgt.model")
    assert src.model_bytes != tgt.model_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.src.model", "m.src.vocab", "m.tgt.model", "m.tgt.vocab"]


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("missing", [], "no such file"),
        ("empty", [], "file is empty"),
        ("binary", [], "not valid UTF-8"),
        ("good", ["--vocab-size", "100000"], "more than this corpus can supply"),
        ("good", ["--separate"], "even number of inputs"),
        ("unwritable", [], "cannot create directory"),
        ("blocked", [], "blocker: is not a directory"),
        ("good", ["--symbol", ""], "user-defined symbols must be non-empty and without spaces, got ''"),
        ("good", ["--sample", "-1"], "sample size must be 0 (all sentences) or positive, got -1"),
        ("good", ["--vocab-size", "300", "--no-byte-fallback"],
         "vocabulary size 300 is more than this corpus can supply"),
        ("exists", [], "m.model: already exists (use --overwrite to replace it)"),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(tmp_path: Path, corpus_dir: Path, setup: str, extra: list[str],
                                               message: str) -> None:
    source = tmp_path / "in.txt"
    prefix = tmp_path / "out" / "m"
    if setup == "empty":
        source.write_bytes(b"")
    elif setup == "binary":
        source.write_bytes(b"fine\n\x80\x81\n")
    elif setup in ("good", "unwritable", "blocked", "exists"):
        source.write_text((corpus_dir / "train.en").read_text())
    if setup in ("unwritable", "blocked"):
        (tmp_path / "blocker").write_text("a file, not a directory")
        prefix = tmp_path / "blocker" / ("sub" if setup == "unwritable" else "") / "m"
    if setup == "exists":
        prefix.parent.mkdir()
        Path(f"{prefix}.model").write_bytes(b"an earlier model")
    result = nmt("tokenizer", str(source), "-o", str(prefix), *extra)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "INTERNAL" not in result.stderr and "_coverage" not in result.stderr
    assert (not list(tmp_path.rglob("*.model"))
            or setup == "exists" and Path(f"{prefix}.model").read_bytes() == b"an earlier model")


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = nmt("--debug", "tokenizer", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "m"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "no such file" in result.stderr
