"""The output layer's CPU kernel (nmt.kernels): the same products, a choice that follows the timings, and
searches whose invariants hold under either kernel."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

import nmt.kernels
from nmt.checkpoint import load_checkpoint
from nmt.config import DecodeConfig, ModelConfig
from nmt.errors import NmtError
from nmt.kernels import choose_output_kernel, onednn_available, project
from nmt.models import build_model
from nmt.search import beam_search, greedy_search, search
from nmt.translate import Translator
from tests.conftest import make_parallel
from tests.test_search import assert_same, batch_of, flat, random_sentences, teacher_forced

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
SOURCES = make_parallel(16, seed=11)[0]


def transformer() -> nn.Module:
    torch.manual_seed(3)
    config = ModelConfig(src_vocab_size=40, tgt_vocab_size=40, joint_vocab=True, enc_layers=2, dec_layers=2,
                         d_model=32, heads=4, ffn_dim=64, max_positions=64)
    model = build_model(config).eval()
    with torch.no_grad():
        model.output.weight[2] *= 2.0  # EOS (id 2) more likely: outputs of mixed lengths
    return model


@needs_onednn
@torch.no_grad()
def test_onednn_projection_gives_the_layers_products() -> None:
    linear = nn.Linear(32, 300)
    for rows in (1, 5, 64):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(project(linear, x, "onednn"), linear(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(project(linear, x), linear(x))
    three_dims = torch.randn(2, 3, 32)
    assert torch.equal(project(linear, three_dims, "onednn"), linear(three_dims))  # only 2-D goes to oneDNN


@pytest.mark.parametrize(("onednn_seconds", "expected"), [(1.0, "onednn"), (1.95, "default"), (3.0, "default")])
def test_auto_takes_onednn_only_where_it_is_clearly_faster(onednn_seconds: float, expected: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nmt.kernels, "onednn_available", lambda: True)
    monkeypatch.setattr(nmt.kernels, "best_seconds",
                        lambda function, x, calls: onednn_seconds if function.__name__ == "onednn" else 2.0)
    model = transformer()
    assert choose_output_kernel(model) == expected and model.output_kernel == expected
    assert choose_output_kernel(model, "default") == "default" and model.output_kernel == "default"


def test_models_without_a_kernel_choice_and_unknown_kernels() -> None:
    gru = build_model(ModelConfig(arch="rnn", cell="gru", src_vocab_size=20, tgt_vocab_size=20, joint_vocab=True,
                                  embed_dim=8, hidden_size=8, enc_layers=1, dec_layers=1))
    assert choose_output_kernel(gru, "onednn") == "default" and not hasattr(gru, "output_kernel")
    with pytest.raises(NmtError, match="unknown output kernel 'mkl'"):
        choose_output_kernel(transformer(), "mkl")


@needs_onednn
def test_searches_keep_their_invariants_under_onednn() -> None:
    """Batched == alone, beam of one == greedy, and scores equal to teacher forcing (which projects with the
    default kernel) within 1e-4. oneDNN may reduce a row in another order in a batch of another shape, so
    the same tokens with scores to 1e-5, as on CUDA, not bitwise as with the default kernel."""
    model = transformer()
    model.output_kernel = "onednn"
    sentences = random_sentences(8, 40, seed=4, longest=8)
    order = list(range(len(sentences)))
    random.Random(5).shuffle(order)
    src, mask = batch_of([sentences[i] for i in order], extra_pad=2)
    for config in (DecodeConfig(beam=1, nbest=1, max_len_a=1.0, max_len_b=4),
                   DecodeConfig(beam=4, nbest=2, max_len_a=1.0, max_len_b=4, length_penalty="average")):
        batched = search(model, src, mask, config)
        alone = [search(model, *batch_of([s]), config)[0] for s in sentences]
        for got, expected in zip([batched[order.index(i)] for i in range(len(sentences))], alone, strict=True):
            assert_same(got, flat([expected])[0])
    greedy_config = DecodeConfig(beam=1, nbest=1, max_len_a=1.0, max_len_b=4)
    greedy = greedy_search(model, src, mask, greedy_config)
    assert [[h.tokens for h in s] for s in beam_search(model, src, mask, greedy_config)] == \
        [[h.tokens for h in s] for s in greedy]
    assert len({len(hyps[0].tokens) for hyps in greedy}) > 2
    for h, raw in zip([h for s in greedy for h in s], teacher_forced(model, src, mask, greedy), strict=True):
        assert h.raw_score == pytest.approx(raw, abs=1e-4)


@needs_onednn
def test_a_translator_under_onednn_copies_and_translates_a_sentence_as_in_a_batch(
        copy_model: Path, tiny_models: dict[str, Path]) -> None:
    copy = Translator(load_checkpoint(copy_model), device="cpu", precision="fp32", output_kernel="onednn")
    assert copy.output_kernel == "onednn" and copy.model.output_kernel == "onednn"
    assert copy.translate(SOURCES) == SOURCES  # fixed by construction
    tiny = Translator(load_checkpoint(tiny_models["transformer"]), device="cpu", precision="fp32",
                      output_kernel="onednn")
    assert [tiny.translate([text])[0] for text in SOURCES] == tiny.translate(SOURCES)
    int8 = Translator(load_checkpoint(copy_model), device="cpu", precision="fp32", quantize="int8",
                      output_kernel="onednn")
    assert int8.output_kernel == "default"  # int8 layers keep their own kernels
