"""`nmt translate` and `nmt average`: as real subprocesses where streams matter, else through Typer's runner."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from nmt.checkpoint import load_checkpoint
from nmt.translate import Translator
from tests.conftest import make_parallel

runner = CliRunner()
SOURCES = make_parallel(8, seed=7)[0]
CPU = ["--device", "cpu", "--threads", "1"]


def nmt(*args: str, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run the installed `nmt` console script (bytes in and out: the streams are what is tested)."""
    exe = Path(sys.executable).with_name("nmt")
    env = {**{k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}, **env}
    return subprocess.run([str(exe), *args], input=stdin, capture_output=True, env=env, timeout=300)


def translations(checkpoint: Path, texts: list[str], **decode: object) -> list[str]:
    ckpt = load_checkpoint(checkpoint)
    return Translator(ckpt, decode=replace(ckpt.config.decode, **decode), device="cpu", threads=1).translate(texts)


def assert_one_line_error(exit_code: int, stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert exit_code == 1 and len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], stderr
    assert "Traceback" not in stderr


def test_stdin_to_stdout_equals_the_translator(tiny_models: dict[str, Path]) -> None:
    lines = [SOURCES[0], "", SOURCES[1], "   ", SOURCES[2] + "\r", "", SOURCES[3]]
    stdin = "\n".join(lines).encode()  # CRLF on one line, no newline after the last
    # UTF-8 in, so UTF-8 out, even where the locale's encoding is ASCII
    result = nmt("translate", "-m", str(tiny_models["transformer"]), *CPU, stdin=stdin, PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stderr.decode()
    expected = translations(tiny_models["transformer"], [line.rstrip("\r") for line in lines])
    assert [expected[i] for i in (1, 3, 5)] == ["", "", ""] and all(expected[i] for i in (0, 2, 4, 6))
    assert not "".join(expected).isascii()
    assert result.stdout.decode() == "".join(t + "\n" for t in expected)  # one line per input, in order
    assert result.stderr == b""


def _read_line(stream, timeout: float = 120) -> bytes:  # noqa: ANN001
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no translation arrived while stdin stayed open"
    return stream.readline()


def test_streaming_answers_each_line_before_stdin_closes(tiny_models: dict[str, Path]) -> None:
    exe = Path(sys.executable).with_name("nmt")
    checkpoint = tiny_models["gru"]
    expected = translations(checkpoint, SOURCES[:2], beam=2)
    with subprocess.Popen([str(exe), "translate", "-m", str(checkpoint), "--beam", "2", *CPU],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            for text, translation in zip(SOURCES[:2], expected):
                proc.stdin.write(text.encode() + b"\n")
                proc.stdin.flush()
                assert _read_line(proc.stdout) == translation.encode() + b"\n"
            proc.stdin.close()
            assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
            assert proc.stdout.read() == b""
        finally:
            proc.kill()


def test_files_with_nbest(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text(f"{SOURCES[0]}\n\n{SOURCES[1]}\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    result = nmt("translate", "-m", str(tiny_models["transformer"]), "-i", str(source), "-o", str(out), "--nbest", "3", *CPU)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"" and b"Translation" in result.stderr  # the summary, on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # no temporary file left
    ckpt = load_checkpoint(tiny_models["transformer"])
    tr = Translator(ckpt, decode=replace(ckpt.config.decode, nbest=3), device="cpu", threads=1)
    expected = tr.translate_nbest([SOURCES[0], "", SOURCES[1]])
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert [int(r[0]) for r in rows] == [0, 0, 0, 1, 2, 2, 2]  # n per input, one for an empty input
    assert [r[2] for r in rows] == [h.text for hyps in expected for h in hyps]
    assert [float(r[1]) for r in rows] == pytest.approx([h.score for hyps in expected for h in hyps], abs=1e-4)
    assert all(len(r[1].split(".")[1]) == 4 for r in rows)


def test_input_can_be_a_pipe(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """`-i /dev/stdin` reads the pipe once (no line count first) and is not taken for an empty file."""
    out = tmp_path / "out.txt"
    stdin = "".join(line + "\n" for line in SOURCES[:3]).encode()
    result = nmt("translate", "-m", str(tiny_models["transformer"]), "-i", "/dev/stdin", "-o", str(out), *CPU, stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_text(encoding="utf-8") == "".join(t + "\n" for t in translations(tiny_models["transformer"], SOURCES[:3]))
    # prepare reads its files twice (count, then encode): a pipe is refused in one line there
    piped = nmt("prepare", "-o", str(tmp_path / "data"), "--train-src", "/dev/stdin", "--train-tgt", "/dev/stdin",
                "--train-tokenizer", stdin=stdin)
    assert_one_line_error(piped.returncode, piped.stderr.decode(), "/dev/stdin: is a pipe or device")


def test_scores_and_int8_through_the_runner(tiny_models: dict[str, Path]) -> None:
    checkpoint = str(tiny_models["transformer"])
    stdin = "\n".join(SOURCES[:3]) + "\n"
    result = runner.invoke(app, ["translate", "-m", checkpoint, "--scores", "--beam", "2", *CPU], input=stdin)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(checkpoint)
    expected = Translator(ckpt, decode=replace(ckpt.config.decode, beam=2), device="cpu", threads=1).translate_nbest(SOURCES[:3])
    assert result.stdout == "".join(f"{hyps[0].score:.4f}\t{hyps[0].text}\n" for hyps in expected)
    quantized = runner.invoke(app, ["translate", "-m", checkpoint, "--quantize", "int8", *CPU], input=stdin)
    assert quantized.exit_code == 0, quantized.output
    assert len(quantized.stdout.splitlines()) == 3 and all(quantized.stdout.splitlines())
    assert quantized.stderr == ""  # torch's quantization notices are not shown


def test_error_as_subprocess(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_models["transformer"].read_bytes()[:5000])
    result = nmt("translate", "-m", str(truncated), *CPU, stdin=b"a man\n")
    assert_one_line_error(result.returncode, result.stderr.decode(), f"{truncated}: corrupt or truncated checkpoint")
    assert result.stdout == b""


def test_invalid_utf8_stops_or_is_replaced(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    stdin = b"fine\n\xff\xfe a man\n" + SOURCES[0].encode() + b"\n"
    strict = runner.invoke(app, ["translate", "-m", str(tiny_models["transformer"]), *CPU], input=stdin)
    assert_one_line_error(strict.exit_code, strict.stderr, "stdin: line 2 is not valid UTF-8 (byte 0); use --errors replace")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(stdin)
    to_file = runner.invoke(app, ["translate", "-m", str(tiny_models["transformer"]), "-i", str(bad), "-o", str(tmp_path / "out.txt"), *CPU])
    assert_one_line_error(to_file.exit_code, to_file.stderr, f"{bad}: line 2 is not valid UTF-8 (byte 0)")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.txt"]  # nothing written, no temporary file left
    result = runner.invoke(app, ["translate", "-m", str(tiny_models["transformer"]), "--errors", "replace", *CPU], input=stdin)
    assert result.exit_code == 0, result.output
    expected = translations(tiny_models["transformer"], ["fine", "\ufffd\ufffd a man", SOURCES[0]])
    assert result.stdout.splitlines() == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "{missing}"], "{missing}: no such checkpoint"),
        (["-m", "{future}"], "{future}: checkpoint format version 99 is not supported"),
        (["-m", "{model}", "--nbest", "4", "--beam", "3"], "nbest 4 is larger than the beam size 3"),
        (["-m", "{model}", "--quantize", "int4"], "unknown quantization 'int4'; choose one of none, int8"),
        (["-m", "{model}", "--precision", "fp8"], "unknown precision 'fp8'"),
        (["-m", "{model}", "--errors", "ignore"], "--errors must be strict or replace, got 'ignore'"),
        (["-m", "{model}", "--buffer-size", "0"], "--buffer-size must be positive"),
        (["-m", "{model}", "--batch-tokens", "0"], "--batch-tokens must be positive"),
        (["-m", "{model}", "-i", "{missing}"], "{missing}: no such file"),
        (["-m", "{model}", "--length-penalty", "cubic"], "unknown length penalty 'cubic'"),
    ],
)
def test_errors_are_one_line(tiny_models: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    payload = torch.load(tiny_models["transformer"], weights_only=True)
    torch.save({**payload, "version": 99}, tmp_path / "future.pt")
    names = {"missing": str(tmp_path / "missing.pt"), "future": str(tmp_path / "future.pt"), "model": str(tiny_models["transformer"])}
    result = runner.invoke(app, ["translate", *(a.format(**names) for a in args), *CPU], input="a man\n")
    assert_one_line_error(result.exit_code, result.stderr, message.format(**names))
    assert isinstance(result.exception, SystemExit) and result.stdout == ""


def test_average_two_checkpoints_and_last_n(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    run = tiny_models["transformer"].parent
    first, last = sorted(run.glob("update_*.pt"))[-2:]
    result = runner.invoke(app, ["average", str(first), str(last), "-o", str(tmp_path / "avg.pt")])
    assert result.exit_code == 0, result.output
    averaged = load_checkpoint(tmp_path / "avg.pt")
    a, b = load_checkpoint(first).model_state, load_checkpoint(last).model_state
    assert averaged.train_state is None
    for key, value in averaged.model_state.items():
        assert torch.allclose(value, (a[key] + b[key]) / 2, atol=1e-6), key
    out = translations(tmp_path / "avg.pt", SOURCES)
    assert len(out) == len(SOURCES) and any(out)
    result = runner.invoke(app, ["average", str(run), "--last", "2", "-o", str(tmp_path / "last.pt")])
    assert result.exit_code == 0, result.output
    again = load_checkpoint(tmp_path / "last.pt").model_state
    assert all(torch.equal(again[key], value) for key, value in averaged.model_state.items())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{transformer}", "{gru}"], "{transformer}: model or tokenizer differs from {gru}; only checkpoints of one model can be averaged"),
        (["{transformer}", "--last", "2"], "--last N takes exactly one run directory"),
        (["{empty}", "--last", "2"], "{empty}: no update_*.pt checkpoints"),
        (["{run}", "--last", "-1"], "--last must be 1 or more, got -1"),
        (["{missing}"], "{missing}: no such checkpoint"),
    ],
)
def test_average_errors(tiny_models: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    names = {**{k: str(v) for k, v in tiny_models.items()}, "run": str(tiny_models["transformer"].parent),
             "empty": str(tmp_path / "empty"), "missing": str(tmp_path / "missing.pt")}
    result = runner.invoke(app, ["average", *(a.format(**names) for a in args), "-o", str(tmp_path / "avg.pt")])
    assert_one_line_error(result.exit_code, result.stderr, message.format(**names))
    assert not (tmp_path / "avg.pt").exists()
