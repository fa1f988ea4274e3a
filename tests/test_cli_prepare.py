"""`nmt prepare` through Typer's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from nmt.data import PreparedData

runner = CliRunner()


def files(directory: Path, split: str) -> list[str]:
    return [f"--{split}-src", str(directory / f"{split}.en"), f"--{split}-tgt", str(directory / f"{split}.de")]


def test_files_with_a_given_tokenizer(corpus_dir: Path, joint_spm: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = runner.invoke(app, ["prepare", *files(corpus_dir, "train"), *files(corpus_dir, "valid"),
                                 "--tokenizer", str(joint_spm), "-o", str(out), "--max-tokens", "512"])
    assert result.exit_code == 0, result.output
    data = PreparedData.open(out)
    counts = data.meta["splits"]["train"]["counts"]
    assert counts["read"] == 600 and counts["kept"] == len(data.split("train"))
    assert data.languages == ("en", "de")  # from the files' suffixes, train.en and train.de
    for text in ("training pairs read", "600", "dropped: duplicate", "valid", "40 pairs", "padding estimate",
                 "512 tokens", "en -> de"):
        assert text in result.output
    again = runner.invoke(app, ["prepare", *files(corpus_dir, "train"), "--tokenizer", str(joint_spm), "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_one_language_code_given_means_none_is_guessed(corpus_dir: Path, joint_spm: Path, tmp_path: Path) -> None:
    """Half the pair given (here contradicting train.en): no code is read from the file names."""
    out = tmp_path / "data"
    result = runner.invoke(app, ["prepare", *files(corpus_dir, "train"), "--src-lang", "fr",
                                 "--tokenizer", str(joint_spm), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert PreparedData.open(out).languages is None
    assert "unknown (--src-lang)" in result.output


def test_jsonl_through_datasets_with_carving_and_a_trained_tokenizer(corpus_dir: Path, tmp_path: Path) -> None:
    src, tgt = ((corpus_dir / f"train.{s}").read_text(encoding="utf-8").splitlines() for s in ("en", "de"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"translation": {"en": s, "de": t}}) + "\n"
                            for s, t in zip(src, tgt, strict=True)))
    out = tmp_path / "data"
    result = runner.invoke(app, [
        "prepare", "--hf-dataset", "json", "--hf-data-files", str(path), "--hf-cache-dir", str(tmp_path / "cache"),
        "--src-lang", "en", "--tgt-lang", "de", "--valid-size", "50", "--test-size", "25",
        "--train-tokenizer", "--vocab-size", "300", "--normalization", "NFKC", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = PreparedData.open(out)
    assert (len(data.split("valid")), len(data.split("test"))) == (50, 25)
    assert data.src_tokenizer.normalization == "NFKC" and data.src_tokenizer.vocab_size == 300
    assert data.meta["splits"]["train"]["source"]["kind"] == "huggingface"
    assert data.meta["splits"]["train"]["source"]["carved_out"] == 75
    assert data.meta["splits"]["valid"]["source"]["from"]["kind"] == "huggingface"
    assert data.languages == ("en", "de")  # as given


def test_trained_tokenizer_size_is_auto_unless_given(corpus_dir: Path, tmp_path: Path) -> None:
    """Without --vocab-size the size follows the training pairs, and the summary says why; a number given wins."""
    result = runner.invoke(app, ["prepare", *files(corpus_dir, "train"), "--train-tokenizer",
                                 "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    data = PreparedData.open(tmp_path / "a")
    trained = data.meta["tokenizer"]["trained"]
    counts = data.meta["splits"]["train"]["counts"]
    pairs = counts["read"] - counts["empty"] - counts["duplicate"] - counts["overlap"]  # the text the tokenizer saw
    assert trained["vocab_size"] == "auto"
    assert trained["vocab_reason"].startswith(f"2,000 for {pairs:,} sentence pairs (")
    assert trained["vocab_reason"].endswith(f"; {data.src_tokenizer.vocab_size:,}, the nearest size SentencePiece "
                                            "can build from this text")
    line = next(line for line in result.output.splitlines() if "vocabulary size" in line)
    assert f"auto: 2,000 for {pairs:,} sentence pairs" in line
    given = runner.invoke(app, ["prepare", *files(corpus_dir, "train"), "--train-tokenizer", "--vocab-size", "300",
                                "-o", str(tmp_path / "b")])
    assert given.exit_code == 0, given.output
    data = PreparedData.open(tmp_path / "b")
    assert data.src_tokenizer.vocab_size == 300 and data.meta["tokenizer"]["trained"]["vocab_reason"] == ""
    assert "vocabulary size" not in given.output and "auto:" not in given.output


def error_of(args: list[str]) -> str:
    result = runner.invoke(app, ["prepare", *args])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("missing", [], "a.en: no such file"),
        ("empty", [], "a.de: file is empty"),
        ("misaligned", [], "a.en has 2 lines but"),
        ("binary", [], "a.de: line 2 is not valid UTF-8"),
        ("good", ["--valid-size", "1", "--valid-src", "a.en", "--valid-tgt", "a.de"], "given and also to be carved"),
        ("good", ["--valid-size", "5"], "cannot carve 5 valid/test pairs out of 2"),
        ("good", ["--train", "a.tsv"], "give the train set one way"),
        ("none", ["--tokenizer", "SPM"], "no training data"),
        ("good", ["--train-tokenizer", "--tokenizer", "SPM"], "choose the tokenizer one way"),
        ("good", ["--train-tokenizer", "--vocab-size", "8k"], "vocabulary size must be a number of pieces or 'auto'"),
        ("good", ["--normalization", "NFD"], "unknown normalisation 'NFD'"),
        ("good", ["--max-ratio", "0.5"], "max_ratio must be at least 1"),
        ("hub", ["--hf-dataset", "./nowhere"], "cannot load dataset './nowhere'"),
        ("hub", ["--hf-dataset", "json", "--hf-data-files", "a.jsonl", "--hf-valid-split", "dev"], "split 'dev'"),
        ("hub", ["--hf-dataset", "json", "--hf-data-files", "a.jsonl", "--src-field", "fr"], "no field 'fr'"),
        ("tsv", ["--train", "a.tsv", "--src-field", "fr", "--tgt-field", "de"], "no column 'fr'"),
        ("good", ["--src-lang", "en-GB", "--tgt-lang", "de"], "--src-lang must be a language code such as en, deu"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, joint_spm: Path, monkeypatch: pytest.MonkeyPatch,
                             setup: str, extra: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    content = {"good": (b"a\nb\n", b"x\ny\n"), "empty": (b"a\n", b""), "misaligned": (b"a\nb\n", b"x\n"),
               "binary": (b"a\nb\n", b"x\n\xc3\x28\n")}
    args = ["--train-src", "a.en", "--train-tgt", "a.de"] if setup in (*content, "missing") else []
    if setup in content:
        Path("a.en").write_bytes(content[setup][0])
        Path("a.de").write_bytes(content[setup][1])
    Path("a.jsonl").write_text('{"en": "a", "de": "b"}\n')
    Path("a.tsv").write_text("en\tde\na\tb\n")
    if setup == "hub":
        args = ["--src-lang", "en", "--tgt-lang", "de", "--hf-cache-dir", str(tmp_path / "cache")]
    tokenizer = [] if {"--tokenizer", "--train-tokenizer"} & set(extra) else ["--tokenizer", str(joint_spm)]
    extra = [str(joint_spm) if value == "SPM" else value for value in extra]
    assert message in error_of([*args, *tokenizer, *extra, "-o", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_as_a_subprocess_errors_have_no_traceback(tmp_path: Path, joint_spm: Path) -> None:
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    exe = Path(sys.executable).with_name("nmt")
    env = {k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}
    result = subprocess.run([str(exe), "prepare", "--train-src", str(tmp_path / "a.en"),
                             "--train-tgt", str(tmp_path / "a.de"),
                             "--tokenizer", str(joint_spm), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {tmp_path / 'a.en'} has 3 lines but {tmp_path / 'a.de'} has 2: "
                                     "the files are not aligned")


@pytest.mark.parametrize(("damage", "message"), [
    ("truncated", "a.en.gz: truncated gzip file (it ends before its compressed data does)"),
    ("not gzip", "a.en.gz: not a valid gzip file (Not a gzipped file (b'a\\n'))"),
])
def test_a_damaged_gzip_is_named(tmp_path: Path, joint_spm: Path, damage: str, message: str) -> None:
    """Not Click's bare "Aborted!" (an EOFError), and not gzip's message without the file."""
    import gzip

    whole = gzip.compress(b"a man runs\n" * 2000)
    (tmp_path / "a.en.gz").write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"a\nb\n")
    (tmp_path / "a.de").write_text("ein mann\n" * 2000)
    result = runner.invoke(app, ["prepare", "--train-src", str(tmp_path / "a.en.gz"),
                                 "--train-tgt", str(tmp_path / "a.de"),
                                 "--tokenizer", str(joint_spm), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.stderr.strip() == f"error: {tmp_path / message}", result.output
    assert not (tmp_path / "out").exists()


def test_multi30k(multi30k: Path, tmp_path: Path) -> None:
    out = tmp_path / "multi30k"
    result = runner.invoke(app, [
        "prepare", *files(multi30k, "train"), *files(multi30k, "valid"),
        "--test-src", str(multi30k / "test2016.en"), "--test-tgt", str(multi30k / "test2016.de"),
        "--train-tokenizer", "--vocab-size", "8000", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    meta = PreparedData.open(out).meta
    assert meta["splits"]["train"]["counts"]["read"] == 29000
    assert meta["splits"]["train"]["examples"] > 28900
    assert (meta["splits"]["valid"]["examples"], meta["splits"]["test"]["examples"]) == (1014, 1000)
    assert meta["padding"]["max_tokens"] == 4096 and meta["padding"]["fraction"] < 0.05
