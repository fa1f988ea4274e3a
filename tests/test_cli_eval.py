"""`nmt eval` through Typer's runner and as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from nmt.checkpoint import load_checkpoint
from nmt.evaluate import compare, corpus_scores, sentence_scores

runner = CliRunner()

HYPS = ["The cat sat on the mat.", "A man in a RED hat walks quickly!", "Dogs don't like rain.",
        "Two kids play ball in the park."]
REF1 = ["The cat is sitting on the mat.", "A man in a red hat walks fast!", "Dogs do not like the rain.",
        "Two children play ball in a park."]
REF2 = ["On the mat sat the cat.", "A man wearing a red hat walks quickly.", "Dogs dislike rain.",
        "Two kids are playing with a ball."]
BASE = ["A cat on a mat.", "Man with hat.", "Dog rain.", "Children park."]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "hyp": write(tmp_path / "hyp.txt", HYPS),
        "ref": write(tmp_path / "ref.txt", REF1),
        "ref2": write(tmp_path / "ref2.txt", REF2),
        "base": write(tmp_path / "base.txt", BASE),
    }


def nmt(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `nmt` console script."""
    exe = Path(sys.executable).with_name("nmt")
    env = {k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}
    return subprocess.run([str(exe), *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)


def run_json(*args: str, stdin: str | None = None) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"], input=stdin)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # the whole of stdout is one JSON object


def test_tables_print_score_and_signature(files: dict[str, Path]) -> None:
    result = runner.invoke(app, ["eval", "--hyp", str(files["hyp"]), "-r", str(files["ref"]), "--metrics", "bleu,chrf"])
    assert result.exit_code == 0, result.output
    expected = corpus_scores(HYPS, REF1, metrics="bleu,chrf")
    lines = result.stdout.splitlines()
    for score in expected.values():
        assert str(score) in lines  # sacreBLEU's citable line: NAME|signature = score
        assert f"{score.score:.2f}" in result.stdout
    assert "Corpus scores" in result.stdout


def test_json_schema_and_values(files: dict[str, Path]) -> None:
    out = run_json("--hyp", str(files["hyp"]), "-r", str(files["ref"]), "-r", str(files["ref2"]),
                   "--metrics", "bleu,chrf++,ter", "--lowercase", "--tokenize", "intl")
    assert list(out) == ["hyp", "refs", "lines", "scores"]
    assert (out["hyp"] == str(files["hyp"]) and out["refs"] == [str(files["ref"]), str(files["ref2"])]
            and out["lines"] == 4)
    assert list(out["scores"]) == ["bleu", "chrf++", "ter"]
    expected = corpus_scores(HYPS, [REF1, REF2], metrics="bleu,chrf++,ter", tokenize="intl", lowercase=True)
    for key, entry in out["scores"].items():
        assert list(entry) == ["name", "score", "signature", "details"]
        assert (entry["name"], entry["score"], entry["signature"], entry["details"]) == (
            expected[key].name, expected[key].score, expected[key].signature, expected[key].details
        )
    assert "nrefs:2|case:lc|eff:no|tok:intl" in out["scores"]["bleu"]["signature"]


def test_json_with_baseline_and_sentences(files: dict[str, Path]) -> None:
    out = run_json("--hyp", str(files["hyp"]), "-r", str(files["ref"]), "--baseline", str(files["base"]),
                   "--metrics", "bleu,chrf", "--bootstrap-samples", "100", "--ar-trials", "200", "--seed", "3",
                   "--sentence")
    assert list(out) == ["hyp", "refs", "lines", "scores", "comparison", "sentences"]
    comparison = out["comparison"]
    assert list(comparison) == ["baseline", "metrics"] and comparison["baseline"] == str(files["base"])
    expected = compare(HYPS, BASE, REF1, metrics="bleu,chrf", bootstrap_samples=100, ar_trials=200, seed=3)
    for key, entry in comparison["metrics"].items():
        assert list(entry) == ["name", "signature", "baseline", "system", "p_bootstrap", "p_ar"]
        assert list(entry["baseline"]) == list(entry["system"]) == ["score", "mean", "ci"]
        assert entry["system"] == vars(expected[key].system) and entry["baseline"] == vars(expected[key].baseline)
        assert (entry["p_bootstrap"], entry["p_ar"]) == (expected[key].p_bootstrap, expected[key].p_ar)
        assert "|bs:100|ar:200|seed:3|" in entry["signature"]
    sentences = sentence_scores(HYPS, REF1, metrics="bleu,chrf")
    assert out["sentences"] == [{"line": s.line, "scores": s.scores, "hyp": s.hypothesis, "refs": list(s.references)}
                                for s in sentences]


def test_comparison_table(files: dict[str, Path]) -> None:
    result = runner.invoke(app, ["eval", "--hyp", str(files["hyp"]), "-r", str(files["ref"]),
                                 "--baseline", str(files["hyp"]), "--bootstrap-samples", "50", "--ar-trials", "50"])
    assert result.exit_code == 0, result.output
    assert "p bootstrap" in result.stdout and "1.0000" in result.stdout  # a system against itself
    assert "BLEU|nrefs:1|bs:50|ar:50|seed:12345|case:mixed|eff:no|tok:13a|smooth:exp|version:" in result.stdout


def test_worst_lines(files: dict[str, Path]) -> None:
    out = run_json("--hyp", str(files["base"]), "-r", str(files["ref"]), "--metrics", "chrf,bleu", "--worst", "2")
    everything = sentence_scores(BASE, REF1, metrics="chrf,bleu")
    lowest = sorted(everything, key=lambda s: s.scores["chrf"])[:2]
    assert [s["line"] for s in out["sentences"]] == [s.line for s in lowest]
    result = runner.invoke(app, ["eval", "--hyp", str(files["base"]), "-r", str(files["ref"]), "--worst", "1"])
    assert result.exit_code == 0 and "1 worst lines by bleu" in result.stdout


def test_hypotheses_from_stdin_through_runner(files: dict[str, Path]) -> None:
    piped = run_json("-r", str(files["ref"]), "--metrics", "bleu,ter", stdin="\n".join(HYPS) + "\n")
    from_file = run_json("--hyp", str(files["hyp"]), "-r", str(files["ref"]), "--metrics", "bleu,ter")
    assert piped["hyp"] == "<stdin>" and piped["scores"] == from_file["scores"]


def test_hypotheses_from_stdin_as_subprocess(files: dict[str, Path]) -> None:
    result = nmt("eval", "--ref", str(files["ref"]), "--json", stdin="\n".join(HYPS) + "\n")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["scores"]["bleu"]["score"] == corpus_scores(HYPS, REF1, metrics="bleu")["bleu"].score


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--hyp", "{missing}", "-r", "{ref}"], None, "missing.txt: no such file"),
        (["--hyp", "{empty}", "-r", "{ref}"], None, "empty.txt: file is empty"),
        (["--hyp", "{hyp}", "-r", "{empty}"], None, "empty.txt: file is empty"),
        (["--hyp", "{binary}", "-r", "{ref}"], None, "binary.txt: line 2 is not valid UTF-8"),
        (["--hyp", "{short}", "-r", "{ref}"], None, "line counts differ: {short} has 3 lines, {ref} has 4"),
        (["--hyp", "{hyp}", "-r", "{ref}", "-r", "{short}"], None,
         "line counts differ: {hyp} has 4 lines, {short} has 3"),
        (["--hyp", "{hyp}", "-r", "{ref}", "--baseline", "{short}"], None,
         "line counts differ: {hyp} has 4 lines, {short} has 3"),
        (["--hyp", "{hyp}", "-r", "{ref}", "--metrics", "bleu,meteor"], None,
         "unknown metric 'meteor'; choose from bleu, chrf, chrf++, ter"),
        (["--hyp", "{hyp}", "-r", "{ref}", "--tokenize", "moses"], None,
         "unknown tokenizer 'moses'; choose from none, zh, 13a, intl, char"),
        (["--hyp", "{hyp}", "-r", "{ref}", "--worst", "-1"], None, "--worst must be 1 or more"),
        (["--hyp", "{hyp}", "-r", "{ref}", "--baseline", "{hyp}", "--ar-trials", "0"], None,
         "--ar-trials must be between 1 and 100,000, got 0"),
        (["--hyp", "{hyp}", "-r", "{ref}", "--baseline", "{hyp}", "--bootstrap-samples", "1000000000"], None,
         "--bootstrap-samples must be between 1 and 100,000, got 1000000000"),
        (["-r", "{ref}"], "", "<stdin>: no hypotheses (empty input)"),
        (["-r", "{ref}"], b"ok\n\xc3\x28\n", "<stdin>: line 2 is not valid UTF-8"),
        (["-r", "{ref}"], "just one line\n", "line counts differ: <stdin> has 1 lines, {ref} has 4"),
    ],
)
def test_errors_are_one_line_with_exit_1(files: dict[str, Path], tmp_path: Path, args: list[str],
                                         stdin: str | bytes | None, message: str) -> None:
    names = {
        **{k: str(v) for k, v in files.items()},
        "missing": str(tmp_path / "missing.txt"),
        "empty": str(tmp_path / "empty.txt"),
        "binary": str(tmp_path / "binary.txt"),
        "short": str(write(tmp_path / "short.txt", HYPS[:3])),
    }
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(b"fine\n\x80\x81\n")
    result = runner.invoke(app, ["eval", *(a.format(**names) for a in args)], input=stdin)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message.format(**names) in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.skipif(importlib.util.find_spec("MeCab") is not None, reason="MeCab is installed")
def test_tokenizer_missing_its_extras_as_subprocess(files: dict[str, Path]) -> None:
    result = nmt("eval", "--hyp", str(files["hyp"]), "-r", str(files["ref"]), "--tokenize", "ja-mecab")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert (len(lines) == 1 and lines[0].startswith("error: tokenizer 'ja-mecab' is unavailable")
            and "pip install sacrebleu" in lines[0])
    assert "Traceback" not in result.stderr


def test_help_lists_the_options() -> None:
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    for option in ("--hyp", "--ref", "--metrics", "--tokenize", "--lowercase", "--baseline", "--sentence", "--worst",
                   "--json", "--seed", "--model", "--src", "--hyp-out", "--beam", "--alpha", "--batch-tokens",
                   "--device", "--precision", "--quantize", "--sample-seed"):
        assert option in result.stdout


def test_model_translates_and_scores_like_translate_then_eval(copy_model: Path, corpus_dir: Path,
                                                              tmp_path: Path) -> None:
    src, ref = corpus_dir / "valid.en", corpus_dir / "valid.de"
    decoding = ["--beam", "3", "--alpha", "1.0", "--batch-tokens", "200", "--device", "cpu", "--threads", "1",
                "--precision", "fp32"]
    checkpoint = str(copy_model)
    one_go = run_json("-m", checkpoint, "--src", str(src), "-r", str(ref), "--metrics", "bleu,chrf",
                      "--hyp-out", str(tmp_path / "h.txt"), *decoding)
    translated = runner.invoke(app, ["translate", "-m", checkpoint, "-i", str(src), "-o", str(tmp_path / "t.txt"),
                                     *decoding])
    assert translated.exit_code == 0, translated.output
    assert (tmp_path / "h.txt").read_text(encoding="utf-8") == (tmp_path / "t.txt").read_text(encoding="utf-8")
    assert (tmp_path / "h.txt").read_text(encoding="utf-8") == src.read_text(encoding="utf-8")  # the model copies
    two_steps = run_json("--hyp", str(tmp_path / "t.txt"), "-r", str(ref), "--metrics", "bleu,chrf")
    assert one_go["scores"] == two_steps["scores"] and one_go["lines"] == 40
    assert one_go["hyp"] == str(tmp_path / "h.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.txt", "t.txt"]
    # the decoding options reach the model: a length limit of two tokens and EOS cuts every copy short
    short = run_json("-m", checkpoint, "--src", str(src), "-r", str(ref), "--max-len-a", "0", "--max-len-b", "3",
                     "--hyp-out", str(tmp_path / "short.txt"), "--device", "cpu", "--threads", "1",
                     "--precision", "fp32")
    assert (short["hyp"] == str(tmp_path / "short.txt")
            and short["scores"]["bleu"]["details"] != one_go["scores"]["bleu"]["details"])
    tokenizer = load_checkpoint(copy_model).src_tokenizer
    expected = [tokenizer.decode(tokenizer.encode(line)[:2]) for line in src.read_text(encoding="utf-8").splitlines()]
    assert (tmp_path / "short.txt").read_text(encoding="utf-8").splitlines() == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "{model}", "--hyp", "{hyp}"], "--hyp and --model exclude each other"),
        (["-m", "{model}"], "--model needs --src: the source sentences to translate"),
        (["--src", "{hyp}", "--hyp", "{hyp}"], "--src and --hyp-out need --model"),
        (["--hyp", "{hyp}", "--hyp-out", "{out}"], "--src and --hyp-out need --model"),
        (["-m", "{model}", "--src", "{short}"], "line counts differ: {short} has 3 lines, {ref} has 4"),
        (["-m", "{missing}", "--src", "{hyp}"], "{missing}: no such checkpoint"),
        (["-m", "{model}", "--src", "{hyp}", "--quantize", "int4"], "unknown quantization 'int4'"),
        (["-m", "{model}", "--src", "{hyp}", "--beam", "2", "--alpha", "nan"],
         "alpha (the length penalty exponent) must be in [0, 10], got nan"),
    ],
)
def test_model_errors(files: dict[str, Path], copy_model: Path, tmp_path: Path, args: list[str], message: str) -> None:
    names = {**{k: str(v) for k, v in files.items()}, "model": str(copy_model), "out": str(tmp_path / "out.txt"),
             "missing": str(tmp_path / "missing.pt"), "short": str(write(tmp_path / "short.txt", HYPS[:3]))}
    result = runner.invoke(app, ["eval", *(a.format(**names) for a in args), "-r", str(files["ref"]), "--threads", "1",
                                 "--precision", "fp32"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message.format(**names) in lines[0], result.stderr
    assert isinstance(result.exception, SystemExit) and not (tmp_path / "out.txt").exists()


def test_moses_option_scores_moses_tokens_lowercased(files: dict[str, Path]) -> None:
    pytest.importorskip("sacremoses")
    from nmt.evaluate import moses_tokenize, read_text

    payload = run_json("--hyp", str(files["hyp"]), "-r", str(files["ref"]), "--moses", "en", "--lowercase")
    hyps, refs = moses_tokenize(read_text(files["hyp"]), "en"), moses_tokenize(read_text(files["ref"]), "en")
    expected = corpus_scores(hyps, refs, metrics=("bleu",), tokenize="none", lowercase=True)["bleu"]
    assert payload["scores"]["bleu"]["score"] == pytest.approx(expected.score)
    assert "tok:none" in payload["scores"]["bleu"]["signature"] and "case:lc" in payload["scores"]["bleu"]["signature"]
