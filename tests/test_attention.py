"""Cross-attention extraction: shapes, normalisation, batch invariance, exactness against search."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nmt.attention import attention_maps, cross_attention
from nmt.checkpoint import Checkpoint
from nmt.config import Config, DecodeConfig, ModelConfig
from nmt.data import encode_source
from nmt.models import build_model
from nmt.tokenizer import EOS_ID, Tokenizer
from nmt.translate import Translator

TRANSFORMER = ModelConfig(arch="transformer", joint_vocab=True, d_model=32, heads=4, ffn_dim=64, enc_layers=1,
                          dec_layers=2, max_positions=128)
RNN = ModelConfig(arch="rnn", joint_vocab=True, embed_dim=16, hidden_size=32, enc_layers=1, dec_layers=1)
TEXTS = ["a man runs", "", "the young girl plays with a red ball in the park"]


def make_translator(joint_spm: Path, model: ModelConfig, beam: int = 2) -> Translator:
    """An untrained model: attention is defined whatever the weights."""
    tok = Tokenizer.load(joint_spm)
    config = Config(model=replace(model, src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size),
                    decode=DecodeConfig(beam=beam, max_len_a=1.0, max_len_b=5))
    torch.manual_seed(0)
    state = build_model(config.model).state_dict()
    return Translator(Checkpoint(config, state, tok, tok), device="cpu", precision="fp32")


@pytest.mark.parametrize(("model", "layers", "heads"), [(TRANSFORMER, 2, 4), (RNN, 1, None)])
def test_maps_have_the_right_shape_and_rows_sum_to_one(joint_spm: Path, model: ModelConfig, layers: int,
                                                       heads: int | None) -> None:
    translator = make_translator(joint_spm, model)
    maps = attention_maps(translator, TEXTS, heads=True)
    assert [m.line for m in maps] == [1, 3]  # the empty line has no map
    expected = translator.translate_nbest([TEXTS[0], TEXTS[2]])
    for amap, text, [best, *_] in zip(maps, [TEXTS[0], TEXTS[2]], expected, strict=True):
        source = encode_source(translator.src_tokenizer, text)
        assert amap.text == text and amap.translation == best.text
        assert amap.target == [translator.tgt_tokenizer.id_to_piece(i) for i in best.tokens]
        assert amap.source == [translator.src_tokenizer.id_to_piece(i) for i in source]
        assert amap.source[-1] == amap.target[-1] == "</s>"
        assert amap.weights.shape == (layers, len(amap.target), len(source))
        torch.testing.assert_close(amap.weights.sum(-1), torch.ones(layers, len(amap.target)))
        assert (amap.weights >= 0).all()
        if heads is None:
            assert amap.heads is None
        else:
            assert amap.heads.shape == (layers, heads, len(amap.target), len(source))
            torch.testing.assert_close(amap.heads.sum(-1), torch.ones(layers, heads, len(amap.target)))
            torch.testing.assert_close(amap.heads.mean(1), amap.weights)
    assert all(m.heads is None for m in attention_maps(translator, TEXTS[:1]))


@pytest.mark.parametrize("model", [TRANSFORMER, RNN])
def test_a_sentence_has_the_same_attention_alone_and_in_a_batch(joint_spm: Path, model: ModelConfig) -> None:
    translator = make_translator(joint_spm, model)
    sources = [encode_source(translator.src_tokenizer, text) for text in (TEXTS[0], TEXTS[2])]
    outputs = [[7, 9, 11, 13, 15, 17, EOS_ID], [8, EOS_ID]]  # the short source gets the long output: padding both ways
    together = cross_attention(translator.model, sources, outputs, heads=True)
    for i in range(2):
        alone = cross_attention(translator.model, sources[i:i + 1], outputs[i:i + 1], heads=True)[0]
        torch.testing.assert_close(together[i][0], alone[0], rtol=0, atol=1e-5)
        if together[i][1] is not None:
            torch.testing.assert_close(together[i][1], alone[1], rtol=0, atol=1e-5)


def test_weights_are_those_the_decoder_used_while_searching(joint_spm: Path) -> None:
    """Greedy decoding by hand with keep_attention gives the same weights as teacher-forcing its output."""
    translator = make_translator(joint_spm, TRANSFORMER, beam=1)
    model = translator.model
    source = encode_source(translator.src_tokenizer, TEXTS[2])
    src = torch.tensor([source])
    mask = torch.ones_like(src, dtype=torch.bool)
    state = model.init_state(model.encode(src, mask), mask, keep_attention=True)
    token, tokens, seen = torch.tensor([2]), [], []
    with torch.inference_mode():
        for _ in range(6):
            log_probs, state = model.step(token, state)
            seen.append(state["attention"][0])  # (L, S)
            token = log_probs.argmax(1)
            tokens.append(int(token))
    weights, _ = cross_attention(model, [source], [tokens])[0]
    torch.testing.assert_close(weights, torch.stack(seen, dim=1), rtol=0, atol=1e-6)


def test_attention_checks_its_output_before_translating(copy_model: Path, tmp_path: Path) -> None:
    """An existing -o fails at once, not after the translation (which a missing input would make fail first)."""
    from typer.testing import CliRunner

    from cli.main import app

    (tmp_path / "att").mkdir()
    result = CliRunner().invoke(app, ["attention", "-m", str(copy_model), "-i", str(tmp_path / "missing.txt"),
                                      "-o", str(tmp_path / "att"), "--no-png", "--device", "cpu"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'att'}: already exists (use --overwrite to replace it)"


def test_a_truncated_line_is_said_not_silently_cut(copy_model: Path, tmp_path: Path) -> None:
    """A line longer than the model's positions was drawn cut to them without a word."""
    from typer.testing import CliRunner

    from cli.main import app

    (tmp_path / "long.txt").write_text(" ".join(["a man runs"] * 40) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["attention", "-m", str(copy_model), "-i", str(tmp_path / "long.txt"),
                                      "-o", str(tmp_path / "att"), "--no-png", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.fullmatch(r"warning: line 1: \d+ tokens, truncated to the model's limit of 64",
                                               warnings[0]), result.stderr
