"""`nmt export` and the CTranslate2 engine: seeded random Transformers of every layout translate
the same in both engines (tokens exactly, log-probabilities within 1e-4 in fp32); the copying
model copies through `nmt translate --engine ctranslate2`; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from nmt.checkpoint import Checkpoint
from nmt.config import Config, DecodeConfig, ModelConfig
from nmt.data import encode_source, pad_sources
from nmt.errors import NmtError
from nmt.export import INSTALL_HINT, ExportedModel, export_checkpoint
from nmt.models import build_model
from nmt.search import Hypothesis, length_penalty, max_output_lengths
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from nmt.train.sizing import SIZED_OPTIONS, choose_shape
from nmt.translate import Translator
from tests.conftest import make_parallel
from tests.test_cli_translate import CPU, GERMAN, SOURCES, _read_line, assert_one_line_error, nmt
from tests.test_search import teacher_forced

runner = CliRunner()
LAYOUTS = {  # every option export maps: norm, positions, activation, vocabularies, sharing, tying
    "pre-sinusoidal-relu-shared-tied": dict(norm="pre", positions="sinusoidal", activation="relu"),
    "post-learned-gelu-shared-untied": dict(norm="post", positions="learned", activation="gelu", tie_output=False),
    "pre-learned-gelu-joint-unshared": dict(norm="pre", positions="learned", activation="gelu", share_embeddings=False),
    "post-sinusoidal-relu-separate-untied": dict(norm="post", positions="sinusoidal", activation="relu",
                                                 separate=True, tie_output=False),
    "pre-sinusoidal-gelu-separate-tied": dict(norm="pre", positions="sinusoidal", activation="gelu", separate=True,
                                              d_model=64, heads=4, enc_layers=1, dec_layers=1),
    "post-concatenated-swish-shared-tied-bias": dict(norm="post", positions="sinusoidal", activation="swish",
                                                     position_layout="concatenated", output_bias=True,
                                                     eos=(8.0, 0.2)),
}

def _auto_sized_shape() -> dict:
    """The model shape `nmt train` chooses for a 10k-pair corpus (nmt.train.sizing), with its defaults."""
    config = Config()
    choose_shape(config, 10_000, SIZED_OPTIONS)
    return {key: getattr(config.model, key) for key in ("d_model", "heads", "ffn_dim", "enc_layers", "dec_layers",
                                                       "norm", "positions", "activation")}


LAYOUTS["auto-sized-10k-pairs"] = _auto_sized_shape()
EOS_POSITION, EOS_BIAS = 8.0, 0.1  # EOS's weight on the falling position channel and on the constant one
DECODE = DecodeConfig(beam=1, alpha=0.6, max_len_a=1.0, max_len_b=6)
TEXTS = make_parallel(24, seed=5)[0] + make_parallel(8, seed=6)[1]


def random_checkpoint(src: Tokenizer, tgt: Tokenizer, layout: dict, seed: int = 3,
                      eos: tuple[float, float] = (EOS_POSITION, EOS_BIAS)) -> Checkpoint:
    """A seeded random Transformer whose outputs end at mixed lengths, with PAD and BOS unlikely.

    Random decoders rarely choose EOS, or choose it at once, so two channels of the decoder's output
    are set: one the final LayerNorm holds at 16 (gain 0), through which PAD and BOS get a logit of
    -16 (a trained model never outputs them, nmt bans them) and EOS a constant; and one that only the
    position encoding writes to (cos(0.1 * position), falling over the first 31 positions: no token
    embedding or sub-layer writes there), through which EOS grows more likely with every token.
    """
    options = {"d_model": 32, "heads": 2, "ffn_dim": 64, "enc_layers": 2, "dec_layers": 2, **layout}
    eos = options.pop("eos", eos)  # a layout may need its own rigging to end at mixed lengths
    joint = not options.pop("separate", False)
    config = Config()
    config.model = ModelConfig(src_vocab_size=src.vocab_size, tgt_vocab_size=tgt.vocab_size, joint_vocab=joint,
                               share_embeddings=joint and options.pop("share_embeddings", True), dropout=0.0,
                               max_positions=64, **options)
    config.decode = DECODE
    torch.manual_seed(seed)
    model = build_model(config.model).eval()
    d = config.model.d_model
    # interleaved sinusoid channel 2k + 1 is cos(10000^(-2k/d) * position); concatenated, channel d/2 + k
    constant, position = 0, 2 * (d // 8) + 1 if config.model.position_layout == "interleaved" else d // 2 + d // 8
    final_norm = model.decoder_norm if config.model.norm == "pre" else model.decoder[-1].res_ffn.norm
    with torch.no_grad():
        for layer in model.decoder:
            for linear in (layer.self_attn.out, layer.cross_attn.out, layer.ffn[3]):
                linear.weight[position], linear.bias[position] = 0.0, 0.0
        model.embed.tgt.weight[:, position] = 0.0
        if config.model.positions == "learned":
            model.learned_positions.weight[:, position] = torch.cos(0.1 * torch.arange(config.model.max_positions))
        final_norm.weight[constant], final_norm.bias[constant] = 0.0, 16.0
        model.output.weight[:, constant] *= 0.1
        model.output.weight[[PAD_ID, BOS_ID], constant] = -1.0
        model.output.weight[EOS_ID, position], model.output.weight[EOS_ID, constant] = -eos[0], eos[1]
        if config.model.output_bias:  # a random bias, with BOS masked as in imported models
            model.output.bias.normal_(std=0.5)[[BOS_ID, EOS_ID]] = torch.tensor([float("-inf"), 0.0])
    return Checkpoint(config=config, model_state=model.state_dict(), src_tokenizer=src, tgt_tokenizer=tgt,
                      languages=("en", "de"))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def exported(request: pytest.FixtureRequest, joint_spm: Path, copy_spm: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoint, Path]:
    """Each layout's random checkpoint and its CTranslate2 folder (separate vocabularies: 300 and 64 pieces)."""
    pytest.importorskip("ctranslate2")
    layout = LAYOUTS[request.param]
    joint = Tokenizer.load(joint_spm)
    tgt = Tokenizer.load(copy_spm) if layout.get("separate") else joint
    checkpoint = random_checkpoint(joint, tgt, layout)
    root = tmp_path_factory.mktemp(request.param)
    checkpoint.save(root / "model.pt")
    return checkpoint, export_checkpoint(root / "model.pt", root / "ct2")


def engines(checkpoint: Checkpoint, folder: Path, **decode: object) -> tuple[Translator, Translator]:
    from nmt.engines import CT2Translator

    options = replace(DECODE, **decode)
    return (Translator(checkpoint, decode=options, device="cpu", precision="fp32"),
            CT2Translator(folder, decode=options, device="cpu", precision="fp32", threads=1))


def limits(checkpoint: Checkpoint, decode: DecodeConfig) -> list[int]:
    sources = [encode_source(checkpoint.src_tokenizer, text) for text in TEXTS]
    return max_output_lengths(pad_sources(sources)[1], decode, checkpoint.config.model.max_positions).tolist()


def test_greedy_is_the_same_token_for_token_with_the_same_scores(exported: tuple[Checkpoint, Path]) -> None:
    checkpoint, folder = exported
    ours, theirs = engines(checkpoint, folder)
    early = 0
    for a, b, limit in zip(ours.translate_lines(TEXTS), theirs.translate_lines(TEXTS), limits(checkpoint, DECODE),
                           strict=True):
        assert b.best.tokens == a.best.tokens and b.best.text == a.best.text
        assert b.best.score == pytest.approx(a.best.score, abs=1e-4)
        early += len(a.best.tokens) < limit
    assert 5 <= early < len(TEXTS)  # mixed lengths: most stopped by EOS, some forced at the limit


def test_teacher_forced_log_probabilities_agree(exported: tuple[Checkpoint, Path]) -> None:
    """CTranslate2's score_batch against nmt's forward pass, token by token (EOS included)."""
    checkpoint, folder = exported
    ours, theirs = engines(checkpoint, folder)
    sources = [encode_source(checkpoint.src_tokenizer, text) for text in TEXTS]
    targets = [checkpoint.tgt_tokenizer.encode(text) + [EOS_ID] for text in reversed(TEXTS)]  # any target will do
    src, mask = pad_sources(sources)
    tgt_in, _ = pad_sources([[BOS_ID, *t[:-1]] for t in targets])
    with torch.no_grad():
        log_probs = torch.log_softmax(ours.model(src, mask, tgt_in).float(), -1)  # (B, T, V)
    scored = theirs.engine.score_batch([[theirs.src_pieces[i] for i in s[:-1]] for s in sources],
                                       [[theirs.tgt_pieces[i] for i in t[:-1]] for t in targets], max_input_length=0)
    for row, (target, result) in enumerate(zip(targets, scored, strict=True)):
        expected = log_probs[row, torch.arange(len(target)), torch.tensor(target)]
        assert torch.tensor(result.log_probs) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("alpha", [0.6, 0.0])
def test_beam_search_agrees_on_the_best_hypothesis(exported: tuple[Checkpoint, Path], alpha: float) -> None:
    """The same penalty and stopping rule: nmt's --early-stop is CTranslate2's rule (with alpha 0 both are exact)."""
    checkpoint, folder = exported
    decode = {"beam": 4, "nbest": 2, "alpha": alpha, "early_stop": alpha > 0}
    ours, theirs = engines(checkpoint, folder, **decode)
    compared = 0
    for a, b, limit in zip(ours.translate_lines(TEXTS), theirs.translate_lines(TEXTS),
                           limits(checkpoint, replace(DECODE, **decode)), strict=True):
        if max(len(h.tokens) for h in a.hypotheses + b.hypotheses) < limit:
            assert b.best.tokens == a.best.tokens
            assert b.best.score == pytest.approx(a.best.score, abs=1e-4)
            compared += 1
    assert compared >= 5


@pytest.mark.parametrize("options", [
    {"beam": 4, "nbest": 3, "alpha": 1.0, "length_penalty": "average", "early_stop": True},
    {"sampling": True, "nbest": 3, "top_k": 10, "temperature": 1.5, "seed": 4},
], ids=["beam-average", "sampling"])
def test_where_the_searches_differ_the_scores_are_still_nmt_scores(exported: tuple[Checkpoint, Path],
                                                                  options: dict) -> None:
    """CTranslate2 refills a beam when a hypothesis ends, nmt's beam shrinks: under the average penalty, which
    favours the longer hypotheses found late, their best often differ (CTranslate2's mostly scores higher);
    samples come from another generator. Whatever CTranslate2 finds ends with EOS within the sentence's limit,
    is scored as nmt scores those tokens, and is ranked by nmt's penalty."""
    checkpoint, folder = exported
    decode = replace(DECODE, **options)
    ours, theirs = engines(checkpoint, folder, **options)
    results = list(theirs.translate_lines(TEXTS))
    src, mask = pad_sources([r.source_ids for r in results])
    hypotheses = [[Hypothesis(h.tokens, h.score, 0.0) for h in r.hypotheses] for r in results]
    raws = iter(teacher_forced(ours.model, src, mask, hypotheses))
    for result, limit in zip(results, limits(checkpoint, decode), strict=True):
        assert len(result.hypotheses) == 3
        assert [h.score for h in result.hypotheses] == sorted((h.score for h in result.hypotheses), reverse=True)
        for h in result.hypotheses:
            assert h.tokens[-1] == EOS_ID and EOS_ID not in h.tokens[:-1] and len(h.tokens) <= limit
            assert h.score == pytest.approx(next(raws) / length_penalty(len(h.tokens), decode), abs=1e-4)


def test_exported_folder_describes_itself(exported: tuple[Checkpoint, Path]) -> None:
    checkpoint, folder = exported
    manifest = json.loads((folder / "nmt.json").read_text())
    assert manifest["decode"] == json.loads(json.dumps(DECODE.__dict__))
    assert manifest["normalization"] == checkpoint.src_tokenizer.normalization
    assert manifest["languages"] == ["en", "de"] and ExportedModel(folder).languages == ("en", "de")
    for side, tokenizer in (("src", checkpoint.src_tokenizer), ("tgt", checkpoint.tgt_tokenizer)):
        assert (folder / manifest["tokenizers"][side]).read_bytes() == tokenizer.model_bytes
    vocabularies = {"src": "source_vocabulary.json", "tgt": "target_vocabulary.json"}
    for side, tokenizer in (("src", checkpoint.src_tokenizer), ("tgt", checkpoint.tgt_tokenizer)):
        path = folder / ("shared_vocabulary.json" if checkpoint.config.model.joint_vocab else vocabularies[side])
        pieces = json.loads(path.read_text())
        assert pieces[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
        assert pieces == [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def test_copy_model_through_the_cli_keeps_lines_and_copies(copy_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    lines = [SOURCES[0], "", SOURCES[1], "   ", SOURCES[2] + "\r", "", GERMAN]
    expected = "".join(t + "\n" for t in [SOURCES[0], "", SOURCES[1], "", SOURCES[2], "", GERMAN])
    for quantize in ("none", "int8"):
        folder = tmp_path / quantize
        result = runner.invoke(app, ["export", str(copy_model), "-o", str(folder), "--quantize", quantize])
        assert result.exit_code == 0, result.output
        done = nmt("translate", "--engine", "ctranslate2", "-m", str(folder), *CPU, stdin="\n".join(lines).encode())
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode() == expected
    long = " ".join(SOURCES[:8])  # beyond the copying model's 64 positions: truncated, with a warning
    stdin = f"{SOURCES[3]}\n{long}\n".encode()
    for options in ([], ["--scores"]):  # greedy: the same text, scores and warnings as nmt's engine
        ours = nmt("translate", "-m", str(copy_model), *options, *CPU, stdin=stdin)
        theirs = nmt("translate", "--engine", "ctranslate2", "-m", str(tmp_path / "none"), *options, *CPU, stdin=stdin)
        assert theirs.returncode == 0 and theirs.stderr == ours.stderr and b"truncated" in ours.stderr
        texts = [line.split("\t")[-1] for line in theirs.stdout.decode().splitlines()]
        assert texts == [line.split("\t")[-1] for line in ours.stdout.decode().splitlines()]
        assert texts[0] == SOURCES[3] and long.startswith(texts[1])
    nbest = nmt("translate", "--engine", "ctranslate2", "-m", str(tmp_path / "none"), "--beam", "3", "--nbest", "2",
                *CPU, stdin=f"{SOURCES[3]}\n".encode())
    assert [line.split("\t")[::2] for line in nbest.stdout.decode().splitlines()][0] == ["0", SOURCES[3]]


def test_streaming_answers_each_line_before_stdin_closes(copy_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    folder = export_checkpoint(copy_model, tmp_path / "ct2")
    exe = Path(sys.executable).with_name("nmt")
    with subprocess.Popen([str(exe), "translate", "--engine", "ctranslate2", "-m", str(folder), *CPU],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            for line in (SOURCES[0], GERMAN):
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()
                assert _read_line(proc.stdout) == line.encode() + b"\n"
            proc.stdin.close()
            assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
        finally:
            proc.kill()


def test_rnn_checkpoints_are_refused_in_one_line(joint_spm: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(joint_spm)
    config = Config()
    config.model = ModelConfig(arch="rnn", cell="gru", src_vocab_size=tokenizer.vocab_size, joint_vocab=True,
                               tgt_vocab_size=tokenizer.vocab_size, embed_dim=16, hidden_size=16)
    Checkpoint(config, build_model(config.model).state_dict(), tokenizer, tokenizer).save(tmp_path / "rnn.pt")
    result = runner.invoke(app, ["export", str(tmp_path / "rnn.pt"), "-o", str(tmp_path / "out")])
    assert_one_line_error(result.exit_code, result.output, "CTranslate2 has no recurrent models")
    assert not (tmp_path / "out").exists()


def test_without_ctranslate2_the_commands_say_how_to_install_it(copy_model: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` raises ImportError
    with pytest.raises(NmtError, match=r"pip install 'nmt\[ct2\]'"):
        export_checkpoint(copy_model, tmp_path / "out")
    result = runner.invoke(app, ["export", str(copy_model), "-o", str(tmp_path / "out")])
    assert_one_line_error(result.exit_code, result.output, INSTALL_HINT)
    result = runner.invoke(app, ["translate", "--engine", "ctranslate2", "-m", str(tmp_path)], input="a\n")
    assert_one_line_error(result.exit_code, result.output, INSTALL_HINT)


def test_bad_folders_and_options_are_one_line_errors(copy_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    folder, damaged, future = tmp_path / "ct2", tmp_path / "damaged", tmp_path / "future"
    for path in (folder, damaged, future):
        assert runner.invoke(app, ["export", str(copy_model), "-o", str(path)]).exit_code == 0
    (damaged / "nmt.json").write_text("{")
    manifest = json.loads((future / "nmt.json").read_text())
    (future / "nmt.json").write_text(json.dumps({**manifest, "version": 99}))
    cases = [
        (["translate", "--engine", "ctranslate2", "-m", str(damaged)], "damaged/nmt.json: not valid JSON"),
        (["translate", "--engine", "ctranslate2", "-m", str(future)], "export format version 99 is not supported"),
        (["export", str(copy_model), "-o", str(folder)], "already exists"),
        (["export", str(copy_model), "-o", str(tmp_path / "x"), "--quantize", "int4"], "unknown quantization 'int4'"),
        (["export", str(copy_model), "-o", str(tmp_path / "x"), "--format", "onnx"], "unknown export format 'onnx'"),
        (["translate", "--engine", "ctranslate2", "-m", str(copy_model)], "not a folder"),
        (["translate", "--engine", "ctranslate2", "-m", str(tmp_path)], "no nmt.json"),
        (["translate", "--engine", "ctranslate2", "-m", str(folder), "--exact"], "no exact stopping rule"),
        (["translate", "--engine", "ctranslate2", "-m", str(folder), "--device", "mps"], "not one CTranslate2 runs on"),
        (["translate", "--engine", "onnx", "-m", str(folder)], "unknown engine 'onnx'"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args, input="a\n")
        assert_one_line_error(result.exit_code, result.output, message)


def test_overwrite_replaces_an_earlier_export_and_nothing_else(copy_model: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`-o RUN --overwrite` once deleted the run directory, the checkpoint it read included."""
    pytest.importorskip("ctranslate2")
    run, docs, ct2 = tmp_path / "run", tmp_path / "mydocs", tmp_path / "ct2"
    run.mkdir()
    docs.mkdir()
    (run / "best.pt").write_bytes(copy_model.read_bytes())
    (docs / "letter.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    cases = [
        (run, f"{run}: holds best.pt, which this command reads; refusing to replace it (choose a new folder)"),
        (docs, f"{docs}: is not a folder written by nmt export (no nmt.json of its own); refusing to replace it"),
        (Path("."), ".: is the current directory; refusing to replace it (choose a new folder)"),
    ]
    for output, message in cases:
        result = runner.invoke(app, ["export", str(run / "best.pt"), "-o", str(output), "--overwrite"])
        assert_one_line_error(result.exit_code, result.output, message)
    assert (run / "best.pt").read_bytes() == copy_model.read_bytes() and (docs / "letter.txt").is_file()
    for _ in range(2):  # an earlier export is replaced
        result = runner.invoke(app, ["export", str(run / "best.pt"), "-o", "ct2", "--overwrite"])
        assert result.exit_code == 0, result.output
    (ct2 / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(run / "best.pt"), "-o", "ct2", "--overwrite"])
    assert_one_line_error(result.exit_code, result.output, "ct2: holds files that nmt export does not write (notes")


class CountingEngine:
    """A CTranslate2 translator that counts its translate_batch calls."""

    def __init__(self, engine: object) -> None:
        self.engine, self.calls = engine, 0

    def translate_batch(self, *args: object, **options: object) -> object:
        self.calls += 1
        return self.engine.translate_batch(*args, **options)

    def score_batch(self, *args: object, **options: object) -> object:
        return self.engine.score_batch(*args, **options)


def test_default_beam_runs_batches_of_mixed_limits_and_keeps_each_sentences_limit(
        exported: tuple[Checkpoint, Path]) -> None:
    """nbest 1: a batch runs to its longest sentence's limit in one CTranslate2 call; every output still ends
    with EOS within its own sentence's limit, scored as nmt scores those tokens."""
    checkpoint, folder = exported
    options = {"beam": 4, "nbest": 1, "alpha": 0.6, "early_stop": True}
    decode = replace(DECODE, **options)
    ours, theirs = engines(checkpoint, folder, **options)
    theirs.engine = counting = CountingEngine(theirs.engine)
    results = list(theirs.translate_lines(TEXTS))
    assert 0 < counting.calls <= 2 < len(set(limits(checkpoint, decode)))  # batches by size, not by limit
    src, mask = pad_sources([r.source_ids for r in results])
    raws = teacher_forced(ours.model, src, mask, [[Hypothesis(r.best.tokens, 0.0, 0.0)] for r in results])
    for result, limit, raw in zip(results, limits(checkpoint, decode), raws, strict=True):
        tokens = result.best.tokens
        assert tokens[-1] == EOS_ID and EOS_ID not in tokens[:-1] and len(tokens) <= limit
        assert result.best.score == pytest.approx(raw / length_penalty(len(tokens), decode), abs=1e-4)
