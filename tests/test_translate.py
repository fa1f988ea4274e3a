"""The Translator API with real tiny checkpoints: batch invariance, order, n-best, limits, int8, streaming input."""

from __future__ import annotations

import io
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import nmt.translate
from nmt.checkpoint import Checkpoint, load_checkpoint
from nmt.data import encode_source, pad_sources
from nmt.errors import NmtError
from nmt.io import LineStream, chunks
from nmt.search import Hypothesis, beam_search
from nmt.tokenizer import EOS_ID, Tokenizer
from nmt.translate import LineResult, Translation, Translator
from tests.conftest import make_parallel
from tests.copy_model import copy_checkpoint

MODELS = ("copy", "transformer", "gru")  # set to copy; trained briefly (invariants only, see conftest)
SOURCES = make_parallel(24, seed=5)[0]


@pytest.fixture
def models(copy_model: Path, tiny_models: dict[str, Path]) -> dict[str, Path]:
    return {"copy": copy_model, **tiny_models}


def translator(checkpoint: Path | Checkpoint, device: str = "cpu", **decode: object) -> Translator:
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    return Translator(ckpt, decode=replace(ckpt.config.decode, **decode), device=device, precision="fp32")


def best(results: list[list[Translation]]) -> list[tuple[str, list[int], float]]:
    return [(r[0].text, r[0].tokens, r[0].score) for r in results]


@pytest.mark.parametrize("beam", [1, 5])
@pytest.mark.parametrize("model", MODELS)
def test_batch_invariance_and_order(models: dict[str, Path], model: str, beam: int, device: str) -> None:
    tr = translator(models[model], device, beam=beam)
    alone = [tr.translate_nbest([text])[0][0] for text in SOURCES]
    if model == "copy":
        assert [t.text for t in alone] == SOURCES  # fixed by construction: varied, never empty
    order = list(range(len(SOURCES)))
    random.Random(beam).shuffle(order)
    for batch_tokens in (4096, 40):  # one batch, and many small ones
        tr.batch_tokens = batch_tokens
        shuffled = tr.translate_nbest([SOURCES[i] for i in order])
        for position, index in enumerate(order):
            got = shuffled[position][0]
            assert (got.text, got.tokens) == (alone[index].text, alone[index].tokens), index
            assert got.score == pytest.approx(alone[index].score, abs=1e-4)


def test_empty_inputs_give_empty_translations(copy_model: Path) -> None:
    tr = translator(copy_model, beam=5, nbest=3)
    texts = ["", SOURCES[0], "   ", "\t", SOURCES[1], ""]
    results = tr.translate_nbest(texts)
    assert len(results) == len(texts)
    for text, hypotheses in zip(texts, results, strict=True):
        if text.strip():
            assert len(hypotheses) == 3 and hypotheses[0].text == text
        else:
            assert hypotheses == [Translation("", 0.0, [])]
    assert tr.translate([]) == []
    assert tr.translate(["", ""]) == ["", ""]


@pytest.mark.parametrize("model", MODELS)
def test_nbest_sorted_with_scores_and_top_equals_one_best(models: dict[str, Path], model: str) -> None:
    nbest = translator(models[model], beam=5, nbest=3).translate_nbest(SOURCES)
    one = translator(models[model], beam=5, nbest=1).translate_nbest(SOURCES)
    for hypotheses, single in zip(nbest, one, strict=True):
        assert len(hypotheses) == 3
        scores = [h.score for h in hypotheses]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
        assert len({tuple(h.tokens) for h in hypotheses}) == 3
        assert all(h.tokens[-1] == EOS_ID for h in hypotheses)
        assert (hypotheses[0].text, hypotheses[0].tokens) == (single[0].text, single[0].tokens)


@pytest.mark.parametrize("model", MODELS)
def test_beam_of_one_equals_greedy(models: dict[str, Path], model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = translator(models[model], beam=1)
    greedy = best(tr.translate_nbest(SOURCES))
    monkeypatch.setattr(nmt.translate, "search", beam_search)  # beam search itself with a beam of one
    beam = best(tr.translate_nbest(SOURCES))
    assert [(t, toks) for t, toks, _ in beam] == [(t, toks) for t, toks, _ in greedy]
    assert [s for *_, s in beam] == pytest.approx([s for *_, s in greedy], abs=1e-5)


def test_long_input_is_truncated_with_a_warning(copy_spm: Path) -> None:
    limit = 16
    small = copy_checkpoint(Tokenizer.load(copy_spm), max_positions=limit)
    tr = Translator(small, decode=replace(small.config.decode, beam=3), device="cpu", precision="fp32")
    long = " ".join(make_parallel(40, seed=9)[0])  # hundreds of tokens
    # a prefix of exactly `limit` tokens, EOS included, is not truncated
    fits = next(long[:n] for n in range(len(long)) if len(encode_source(tr.src_tokenizer, long[:n])) == limit)
    results = list(tr.translate_lines(["a dog runs", long, fits], first_line=7))
    out = [r.hypotheses for r in results]
    length = len(encode_source(tr.src_tokenizer, long))
    assert [r.warning for r in results] == [None, f"line 8: {length} tokens, truncated to the model's limit of {limit}",
                                            None]
    # the truncated line translates as its first limit - 1 tokens plus EOS: the copy shows exactly that
    kept = encode_source(tr.src_tokenizer, long)[: limit - 1] + [EOS_ID]
    assert [r[0].tokens for r in out] == [encode_source(tr.src_tokenizer, "a dog runs"), kept,
                                          encode_source(tr.src_tokenizer, fits)]


def test_int8_copies_as_fp32_does(copy_model: Path) -> None:
    ckpt = load_checkpoint(copy_model)
    int8 = Translator(ckpt, device="cpu", quantize="int8", precision="fp32")
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.model.modules())
    assert int8.translate(SOURCES) == SOURCES


def test_int8_output_distribution_stays_close_to_fp32(tiny_models: dict[str, Path]) -> None:
    """Quantisation error on trained weights (random ones give near-uniform outputs that hide it):
    a bound on the distributions, not on what the model translates."""
    ckpt = load_checkpoint(tiny_models["gru"])
    fp32 = Translator(ckpt, device="cpu", precision="fp32")
    int8 = Translator(ckpt, device="cpu", quantize="int8", precision="fp32")
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.model.modules())
    src, src_mask = pad_sources([encode_source(fp32.src_tokenizer, s) for s in SOURCES])
    tgt_in = src.clone()  # any token sequence will do: compare the two models' predictions on it
    tgt_in[:, 0] = 2
    with torch.inference_mode():
        a = torch.log_softmax(fp32.model(src, src_mask, tgt_in).float(), -1)  # (B, T, V)
        b = torch.log_softmax(int8.model(src, src_mask, tgt_in).float(), -1)
    total_variation = (a.exp() - b.exp()).abs().sum(-1)[src_mask] / 2  # (real positions,)
    assert total_variation.mean() < 0.05


def test_option_errors(copy_model: Path) -> None:
    ckpt = load_checkpoint(copy_model)
    with pytest.raises(NmtError, match="unknown quantization 'int4'; choose one of none, int8"):
        Translator(ckpt, device="cpu", quantize="int4")
    with pytest.raises(NmtError, match="unknown precision 'fp8'"):
        Translator(ckpt, device="cpu", precision="fp8")
    with pytest.raises(NmtError, match="nbest 4 is larger than the beam size 2"):
        translator(ckpt, beam=2, nbest=4).translate(["a man"])


def test_line_breaks_never_reach_a_translation(joint_spm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte-fallback pieces can spell a newline; one input line must still give one output line."""
    tr = translator(copy_checkpoint(Tokenizer.load(joint_spm)), beam=1)  # the joint tokenizer has byte fallback
    piece_ids = {tr.tgt_tokenizer.id_to_piece(i): i for i in range(tr.tgt_tokenizer.vocab_size)}
    newline, carriage_return = piece_ids["<0x0A>"], piece_ids["<0x0D>"]
    ein, hund = tr.tgt_tokenizer.encode("ein"), tr.tgt_tokenizer.encode("hund")
    ids = [newline, carriage_return, *ein, newline, *hund, EOS_ID]
    assert tr.tgt_tokenizer.decode(ids).count("\n") == 2

    def scripted(model, sources, decode, batch_tokens, device):
        return [[Hypothesis(ids, -1.0, -1.0)] for _ in sources]

    monkeypatch.setattr(nmt.translate, "translate_ids", scripted)
    assert tr.translate(["a man"]) == ["ein hund"]


def test_line_stream_and_chunks_from_memory() -> None:
    data = b"one\r\ntwo\n\nfour\nfive"  # CRLF, an empty line, no final newline
    assert list(chunks(LineStream(io.BytesIO(data)), 2)) == [["one", "two"], ["", "four"], ["five"]]
    assert list(chunks(LineStream(io.BytesIO(b"")), 2)) == []
    assert list(chunks(["a", "b", "c"], 2)) == [["a", "b"], ["c"]]  # a plain list: whole chunks
    bad = b"fine\n\xff\xfe\nok\n"
    with pytest.raises(NmtError, match=r"^in.txt: line 2 is not valid UTF-8 \(byte 0\); use --errors replace"):
        list(LineStream(io.BytesIO(bad), name="in.txt"))
    assert list(LineStream(io.BytesIO(bad), errors="replace")) == ["fine", "\ufffd\ufffd", "ok"]
    with pytest.raises(NmtError, match="--errors must be strict or replace, got 'ignore'"):
        LineStream(io.BytesIO(bad), errors="ignore")


def test_line_stream_from_a_pipe_fills_chunks_when_input_waits() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"a\nb\nc\n")
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        assert list(chunks(LineStream(stream), 2)) == [["a", "b"], ["c"]]


def test_translate_lines_streams_results_in_order_with_line_numbers(copy_model: Path) -> None:
    """The one loop: lazily consumed input, results in input order, empty lines kept, line numbers counted on."""
    tr = Translator(load_checkpoint(copy_model), device="cpu", precision="fp32", buffer_lines=3)
    consumed: list[str] = []

    def lines():
        for text in [SOURCES[0], "", *SOURCES[1:5]]:
            consumed.append(text)
            yield text

    results = tr.translate_lines(lines(), first_line=10)
    first = next(results)
    assert len(consumed) == 3  # one chunk of buffer_lines read, not the whole input
    rest = list(results)
    assert [r.line for r in [first, *rest]] == list(range(10, 16))
    assert [r.best.text for r in [first, *rest]] == [SOURCES[0], "", *SOURCES[1:5]]
    assert rest[0] == LineResult(11, "", [Translation("", 0.0, [])], [])
    assert first.source_ids == encode_source(tr.src_tokenizer, SOURCES[0])


def test_from_checkpoint_merges_decoding_options(copy_model: Path) -> None:
    tr = Translator.from_checkpoint(copy_model, device="cpu", precision="fp32", beam=4, alpha=None, nbest=2)
    stored = load_checkpoint(copy_model).config.decode
    assert (tr.decode.beam, tr.decode.nbest, tr.decode.alpha) == (4, 2, stored.alpha)  # None keeps the stored value
    with pytest.raises(NmtError, match="unknown decoding option\\(s\\) bream"):
        Translator.from_checkpoint(copy_model, bream=4)
    with pytest.raises(NmtError, match="nbest 3 is larger than the beam size 2"):
        Translator.from_checkpoint(copy_model, device="cpu", beam=2, nbest=3)
