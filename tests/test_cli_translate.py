"""`nmt translate` and `nmt average`: as real subprocesses where streams matter, else through Typer's runner."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import time
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
GERMAN = "ein junges mädchen läuft auf der straße"  # non-ASCII output from the copying model
CPU = ["--device", "cpu", "--threads", "1", "--precision", "fp32"]


def nmt(*args: str, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run the installed `nmt` console script (bytes in and out: the streams are what is tested)."""
    exe = Path(sys.executable).with_name("nmt")
    env = {**{k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}, **env}
    return subprocess.run([str(exe), *args], input=stdin, capture_output=True, env=env, timeout=300)


def translations(checkpoint: Path, texts: list[str], **decode: object) -> list[str]:
    ckpt = load_checkpoint(checkpoint)
    translator = Translator(ckpt, decode=replace(ckpt.config.decode, **decode), device="cpu", precision="fp32")
    return translator.translate(texts)


def assert_one_line_error(exit_code: int, stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert exit_code == 1 and len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], stderr
    assert "Traceback" not in stderr


def test_stdin_to_stdout_copies_exactly(copy_model: Path) -> None:
    """The copying model's output is known in advance: streams, order, empty lines and UTF-8 are checked exactly."""
    lines = [SOURCES[0], "", SOURCES[1], "   ", SOURCES[2] + "\r", "", GERMAN]
    stdin = "\n".join(lines).encode()  # CRLF on one line, no newline after the last
    # UTF-8 in, so UTF-8 out, even where the locale's encoding is ASCII
    result = nmt("translate", "-m", str(copy_model), *CPU, stdin=stdin, PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stderr.decode()
    expected = [SOURCES[0], "", SOURCES[1], "", SOURCES[2], "", GERMAN]
    assert result.stdout.decode() == "".join(t + "\n" for t in expected)  # one line per input, in order
    assert translations(copy_model, [line.rstrip("\r") for line in lines]) == expected  # CLI == library
    assert result.stderr == b""


def _read_line(stream, timeout: float = 120) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no translation arrived while stdin stayed open"
    return stream.readline()


def test_streaming_answers_each_line_before_stdin_closes(copy_model: Path) -> None:
    exe = Path(sys.executable).with_name("nmt")
    checkpoint = copy_model
    lines = [SOURCES[0], GERMAN]  # the copying model translates each line into itself
    with subprocess.Popen([str(exe), "translate", "-m", str(checkpoint), "--beam", "2", *CPU],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            for line in lines:
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()
                assert _read_line(proc.stdout) == line.encode() + b"\n"
            proc.stdin.close()
            assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
            assert proc.stdout.read() == b""
        finally:
            proc.kill()


def test_files_with_nbest(copy_model: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text(f"{SOURCES[0]}\n\n{GERMAN}\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    result = nmt("translate", "-m", str(copy_model), "-i", str(source), "-o", str(out), "--beam", "5", "--nbest", "3",
                 *CPU)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"" and b"Translation" in result.stderr  # the summary, on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # no temporary file left
    ckpt = load_checkpoint(copy_model)
    tr = Translator(ckpt, decode=replace(ckpt.config.decode, beam=5, nbest=3), device="cpu", precision="fp32")
    expected = tr.translate_nbest([SOURCES[0], "", GERMAN])
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert [int(r[0]) for r in rows] == [0, 0, 0, 1, 2, 2, 2]  # n per input, one for an empty input
    assert [rows[i][2] for i in (0, 3, 4)] == [SOURCES[0], "", GERMAN]  # the copy is the best
    assert rows[3][1] == "0.0000"
    assert [r[2] for r in rows] == [h.text for hyps in expected for h in hyps]
    assert [float(r[1]) for r in rows] == pytest.approx([h.score for hyps in expected for h in hyps], abs=1e-4)
    assert all(len(r[1].split(".")[1]) == 4 for r in rows)


def test_input_can_be_a_pipe(copy_model: Path, tmp_path: Path) -> None:
    """`-i /dev/stdin` reads the pipe once (no line count first) and is not taken for an empty file."""
    out = tmp_path / "out.txt"
    stdin = "".join(line + "\n" for line in SOURCES[:3]).encode()
    result = nmt("translate", "-m", str(copy_model), "-i", "/dev/stdin", "-o", str(out), *CPU, stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_text(encoding="utf-8") == stdin.decode()
    # prepare reads its files twice (count, then encode): a pipe is refused in one line there
    piped = nmt("prepare", "-o", str(tmp_path / "data"), "--train-src", "/dev/stdin", "--train-tgt", "/dev/stdin",
                "--train-tokenizer", stdin=stdin)
    assert_one_line_error(piped.returncode, piped.stderr.decode(), "/dev/stdin: is a pipe or device")


def test_scores_and_int8_through_the_runner(copy_model: Path) -> None:
    checkpoint = str(copy_model)
    stdin = "\n".join(SOURCES[:3]) + "\n"
    result = runner.invoke(app, ["translate", "-m", checkpoint, "--scores", "--beam", "2", *CPU], input=stdin)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(checkpoint)
    translator = Translator(ckpt, decode=replace(ckpt.config.decode, beam=2), device="cpu", precision="fp32")
    expected = translator.translate_nbest(SOURCES[:3])
    assert result.stdout == "".join(f"{hyps[0].score:.4f}\t{hyps[0].text}\n" for hyps in expected)
    assert [line.split("\t")[1] for line in result.stdout.splitlines()] == SOURCES[:3]
    quantized = runner.invoke(app, ["translate", "-m", checkpoint, "--quantize", "int8", *CPU], input=stdin)
    assert quantized.exit_code == 0, quantized.output
    assert quantized.stdout.splitlines() == SOURCES[:3]  # int8 keeps the copy's wide margins
    assert quantized.stderr == ""  # torch's quantization notices are not shown


def test_error_as_subprocess(copy_model: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(copy_model.read_bytes()[:5000])
    result = nmt("translate", "-m", str(truncated), *CPU, stdin=b"a man\n")
    assert_one_line_error(result.returncode, result.stderr.decode(), f"{truncated}: corrupt or truncated checkpoint")
    assert result.stdout == b""


def test_invalid_utf8_stops_or_is_replaced(copy_model: Path, tmp_path: Path) -> None:
    stdin = b"fine\n\xff\xfe a man\n" + SOURCES[0].encode() + b"\n"
    strict = runner.invoke(app, ["translate", "-m", str(copy_model), *CPU], input=stdin)
    assert_one_line_error(strict.exit_code, strict.stderr,
                          "stdin: line 2 is not valid UTF-8 (byte 0); use --errors replace")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(stdin)
    to_file = runner.invoke(app, ["translate", "-m", str(copy_model), "-i", str(bad), "-o", str(tmp_path / "out.txt"),
                                  *CPU])
    assert_one_line_error(to_file.exit_code, to_file.stderr, f"{bad}: line 2 is not valid UTF-8 (byte 0)")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.txt"]  # nothing written, no temporary file left
    result = runner.invoke(app, ["translate", "-m", str(copy_model), "--errors", "replace", *CPU], input=stdin)
    assert result.exit_code == 0, result.output
    expected = translations(copy_model, ["fine", "\ufffd\ufffd a man", SOURCES[0]])
    assert result.stdout.splitlines() == expected and expected[2] == SOURCES[0]


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
        (["-m", "{model}", "--beam", "2", "--alpha", "nan"],
         "alpha (the length penalty exponent) must be in [0, 10], got nan"),
        (["-m", "{model}", "--alpha", "-1"],
         "alpha (the length penalty exponent) must be in [0, 10], got -1.0"),
        (["-m", "{model}", "--beam", "2", "--alpha", "1e308"],  # once an overflow traceback in the penalty
         "alpha (the length penalty exponent) must be in [0, 10], got 1e+308"),
        (["-m", "{model}", "--sample", "--temperature", "inf"],
         "sampling temperature must be a finite positive number, got inf"),
        (["-m", "{model}", "--sample", "--temperature", "nan"],
         "sampling temperature must be a finite positive number, got nan"),
        (["-m", "{model}", "--max-len-b", "-5"], "max-len-a and max-len-b must be >= 0"),
        (["-m", "{model}", "--max-len-a", "-1"], "max-len-a and max-len-b must be >= 0"),
        (["-m", "{model}", "--min-len", "-1"], "min-len must be >= 0, got -1"),
        (["-m", "{text}"], "{text}: not an nmt checkpoint (not a file written by nmt train or nmt average)"),
        (["-m", "{model}", "-i", "{text}", "-o", "{dir}"], "{dir}: is a directory, expected a file name"),
    ],
)
def test_errors_are_one_line(copy_model: Path, tmp_path: Path, args: list[str], message: str) -> None:
    payload = torch.load(copy_model, weights_only=True)
    torch.save({**payload, "version": 99}, tmp_path / "future.pt")
    (tmp_path / "text.txt").write_text("a man\n")
    (tmp_path / "dir").mkdir()
    names = {"missing": str(tmp_path / "missing.pt"), "future": str(tmp_path / "future.pt"), "model": str(copy_model),
             "text": str(tmp_path / "text.txt"), "dir": str(tmp_path / "dir")}
    result = runner.invoke(app, ["translate", *CPU, *(a.format(**names) for a in args)], input="a man\n")  # args win
    assert_one_line_error(result.exit_code, result.stderr, message.format(**names))
    assert isinstance(result.exception, SystemExit) and result.stdout == ""


@pytest.fixture
def copy_run(copy_model: Path, tmp_path: Path) -> Path:
    """A run directory with two checkpoints of the copying model that differ in weights the copy never reads
    (the encoder FFN's first layer feeds a zeroed second layer), so their average still copies."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = load_checkpoint(copy_model)
    for seed, update in ((1, 10), (2, 20)):
        state = dict(ckpt.model_state)
        key = "encoder.0.ffn.0.weight"
        state[key] = torch.randn(state[key].shape, generator=torch.Generator().manual_seed(seed))
        replace(ckpt, model_state=state).save(run / f"update_{update:08d}.pt")
    return run


@pytest.fixture
def gru_checkpoint(copy_spm: Path, tmp_path: Path) -> Path:
    """An untrained GRU over the copying model's tokenizer: another model, for the averaging errors."""
    from nmt.checkpoint import Checkpoint
    from nmt.config import Config, ModelConfig
    from nmt.models import build_model
    from nmt.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(copy_spm)
    size = tokenizer.vocab_size
    config = Config(model=ModelConfig(arch="rnn", cell="gru", src_vocab_size=size, tgt_vocab_size=size,
                                      joint_vocab=True, embed_dim=16, hidden_size=16, enc_layers=1, dec_layers=1))
    Checkpoint(config, build_model(config.model).state_dict(), tokenizer, tokenizer).save(tmp_path / "gru.pt")
    return tmp_path / "gru.pt"


def test_average_two_checkpoints_and_last_n(copy_run: Path, tmp_path: Path) -> None:
    first, last = sorted(copy_run.glob("update_*.pt"))
    result = runner.invoke(app, ["average", str(first), str(last), "-o", str(tmp_path / "avg.pt")])
    assert result.exit_code == 0, result.output
    averaged = load_checkpoint(tmp_path / "avg.pt")
    a, b = load_checkpoint(first).model_state, load_checkpoint(last).model_state
    assert averaged.train_state is None
    assert not torch.equal(a["encoder.0.ffn.0.weight"], b["encoder.0.ffn.0.weight"])
    for key, value in averaged.model_state.items():
        assert torch.allclose(value, (a[key] + b[key]) / 2, atol=1e-6), key
    assert translations(tmp_path / "avg.pt", SOURCES) == SOURCES  # the averaged model still copies
    result = runner.invoke(app, ["average", str(copy_run), "--last", "2", "-o", str(tmp_path / "last.pt")])
    assert result.exit_code == 0, result.output
    again = load_checkpoint(tmp_path / "last.pt").model_state
    assert all(torch.equal(again[key], value) for key, value in averaged.model_state.items())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{transformer}", "{gru}"],
         "{transformer}: model or tokenizer differs from {gru}; only checkpoints of one model can be averaged"),
        (["{transformer}", "--last", "2"], "--last N takes exactly one run directory"),
        (["{empty}", "--last", "2"], "{empty}: no update_*.pt checkpoints"),
        (["{run}", "--last", "-1"], "--last must be 1 or more, got -1"),
        (["{run}", "--last", "0"], "--last must be 1 or more, got 0"),  # once "no such checkpoint"
        (["{run}"], "{run}: a directory, not a checkpoint file (a training run keeps {run}/best.pt and update_*.pt; "
                    "nmt average {run} --last N averages the last N of those)"),
        (["{missing}"], "{missing}: no such checkpoint"),
    ],
)
def test_average_errors(copy_model: Path, gru_checkpoint: Path, copy_run: Path, tmp_path: Path, args: list[str],
                        message: str) -> None:
    (tmp_path / "empty").mkdir()
    names = {"transformer": str(copy_model), "gru": str(gru_checkpoint), "run": str(copy_run),
             "empty": str(tmp_path / "empty"), "missing": str(tmp_path / "missing.pt")}
    result = runner.invoke(app, ["average", *(a.format(**names) for a in args), "-o", str(tmp_path / "avg.pt")])
    assert_one_line_error(result.exit_code, result.stderr, message.format(**names))
    assert not (tmp_path / "avg.pt").exists()


def test_output_to_a_fifo_a_symlink_and_an_empty_input(copy_model: Path, tmp_path: Path) -> None:
    """-o is renamed into place only when it is a regular file: a FIFO's reader gets the lines, a link stays a link."""
    source = tmp_path / "in.txt"
    source.write_text(f"{SOURCES[0]}\n{GERMAN}\n", encoding="utf-8")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE) as reader:
        result = nmt("translate", "-m", str(copy_model), "-i", str(source), "-o", str(fifo), *CPU)
        assert result.returncode == 0, result.stderr.decode()
        assert reader.communicate(timeout=60)[0].decode() == f"{SOURCES[0]}\n{GERMAN}\n"
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("old\n")
    link.symlink_to(target)
    result = nmt("translate", "-m", str(copy_model), "-i", str(source), "-o", str(link), *CPU)
    assert result.returncode == 0, result.stderr.decode()
    assert link.is_symlink() and target.read_text(encoding="utf-8") == f"{SOURCES[0]}\n{GERMAN}\n"
    empty, out = tmp_path / "empty.txt", tmp_path / "out.txt"
    empty.write_bytes(b"")
    result = nmt("translate", "-m", str(copy_model), "-i", str(empty), "-o", str(out), *CPU)
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_bytes() == b""  # as empty stdin gives empty stdout


def test_sigterm_during_translation_leaves_no_temporary_and_stale_ones_go(copy_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    stale = tmp_path / f".out.txt.{2**22 + 12345}.abcd.tmp"  # a pid above Linux's limit: its writer is gone
    stale.write_text("left by a killed run")
    exe = Path(sys.executable).with_name("nmt")
    with subprocess.Popen([str(exe), "translate", "-m", str(copy_model), "-i", "/dev/stdin", "-o", str(out), *CPU],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdin.write(f"{SOURCES[0]}\n".encode())
        proc.stdin.flush()
        deadline = time.time() + 120  # the first line translated: the temporary file holds it
        while time.time() < deadline and not any(p.stat().st_size for p in tmp_path.glob(f".out.txt.{proc.pid}.*.tmp")):
            time.sleep(0.05)
        assert not stale.exists()  # removed when the new run opened its own temporary
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.decode().strip() == "error: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary


def test_average_warns_when_fewer_checkpoints_than_asked(copy_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["average", str(copy_run), "--last", "10", "-o", str(tmp_path / "avg.pt")])
    assert result.exit_code == 0, result.output
    assert f"warning: {copy_run} holds only 2 update checkpoint(s); averaging those, not 10" in result.stderr
