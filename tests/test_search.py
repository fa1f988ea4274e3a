"""Search against scripted toy decoders (exact answers known) and an exhaustive oracle."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from nmt.config import MAX_ALPHA, DecodeConfig
from nmt.errors import NmtError
from nmt.search import (
    Hypothesis,
    beam_search,
    greedy_search,
    length_penalty,
    max_output_lengths,
    search,
)
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

A, B = 4, 5  # the two ordinary tokens of the scripted decoder


class ToyModel:
    """A seeded random decoder: each step's logits are a table row picked by hashing the source and the prefix.

    It follows the model interface and counts its step and reorder calls. The table is drawn on the
    CPU and then moved to `device`, so that every device decodes the same numbers.
    """

    rows = 1 << 16

    def __init__(self, vocab: int, seed: int = 0, scale: float = 2.0, bias: dict[int, float] | None = None,
                 max_positions: int | None = None, device: str = "cpu") -> None:
        logits = torch.randn(self.rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale
        for token, value in (bias or {}).items():
            logits[:, token] += value
        self.logits, self.device = logits.to(device), device
        self.max_positions = max_positions
        self.steps = self.reorders = self.within = 0

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        weights = torch.arange(src.size(1), device=src.device) * 7919 + 13  # (S,)
        return ((src + 1) * weights * src_mask).sum(1) % self.rows  # (B,)

    def init_state(self, memory: Tensor, src_mask: Tensor) -> dict[str, Tensor]:
        sentence = torch.arange(memory.size(0), device=memory.device)
        return {"key": memory, "prefix": torch.zeros_like(memory), "sentence": sentence, "ids": sentence}

    def step(self, tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        self.steps += 1
        prefix = (state["prefix"] * 1000003 + tokens + 1) % self.rows
        row = (state["key"] * 31 + prefix) % self.rows
        return self.logits[row].log_softmax(1), {**state, "prefix": prefix}

    def reorder_state(self, state: dict[str, Tensor], rows: Tensor,
                      sentences: Tensor | None = None) -> dict[str, Tensor]:
        """Checks the search's promise: a sentence's rows side by side, as many for each, in the order of
        the per-sentence entries ("ids"), which only `sentences` renumbers."""
        self.reorders += 1
        ids = state["ids"] if sentences is None else state["ids"][sentences]
        new = {name: value[rows] for name, value in state.items() if name != "ids"}
        assert len(rows) % len(ids) == 0
        assert torch.equal(new["sentence"].view(len(ids), -1), ids[:, None].expand(-1, len(rows) // len(ids)))
        self.within += sentences is None
        return {**new, "ids": ids}

    def finish_immediately(self, src: list[int]) -> None:
        """Make EOS almost certain as the first output token for this source sentence."""
        key = self.encode(*batch_of([src], device=self.device))
        row = (key * 31 + (BOS_ID + 1) % self.rows) % self.rows
        self.logits[row, EOS_ID] = 40.0


class ScriptedModel:
    """Hand-set next-token probabilities keyed by the prefix (without BOS); others get `default`."""

    max_positions = None
    vocab = 6

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], default: dict[int, float],
                 device: str = "cpu") -> None:
        self.table, self.default, self.device = table, default, device

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        return src

    def init_state(self, memory: Tensor, src_mask: Tensor) -> Tensor:
        return torch.zeros(memory.size(0), 0, dtype=torch.long, device=memory.device)  # (B, t) the prefix

    def step(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        prefix = torch.cat([state, tokens.unsqueeze(1)], 1)
        rows = []
        for row in prefix.tolist():
            probs = self.table.get(tuple(row[1:]), self.default)
            weights = torch.tensor([probs.get(t, 1e-6) for t in range(self.vocab)], dtype=torch.float64)
            rows.append((weights / weights.sum()).log().float())
        return torch.stack(rows).to(prefix.device), prefix  # computed on the CPU: the same on every device

    def reorder_state(self, state: Tensor, rows: Tensor, sentences: Tensor | None = None) -> Tensor:
        return state[rows]


def batch_of(sentences: list[list[int]], extra_pad: int = 0, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """The padded source batch (B, S) on `device`, and its mask."""
    width = max(map(len, sentences)) + extra_pad
    src = torch.full((len(sentences), width), PAD_ID)
    for i, sentence in enumerate(sentences):
        src[i, : len(sentence)] = torch.tensor(sentence)
    src = src.to(device)
    return src, src != PAD_ID


def random_sentences(count: int, vocab: int, seed: int, longest: int = 6) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, longest))] for _ in range(count)]


def penalty(length: int, config: DecodeConfig) -> float:
    base = (5 + length) / 6 if config.length_penalty == "gnmt" else length
    return base**config.alpha


def replay(model: ToyModel | ScriptedModel, src: list[int], tokens: list[int]) -> list[Tensor]:
    """The model's log-probabilities (float64) before each output token, fed the tokens one by one."""
    source, mask = batch_of([src], device=model.device)
    state = model.init_state(model.encode(source, mask), mask)
    out = []
    for previous in [BOS_ID, *tokens[:-1]]:
        log_probs, state = model.step(torch.tensor([previous], device=model.device), state)
        out.append(log_probs[0].double().cpu())
    return out


def raw_score(model: ToyModel | ScriptedModel, src: list[int], tokens: list[int]) -> float:
    return sum(float(lp[t]) for lp, t in zip(replay(model, src, tokens), tokens, strict=False))


def oracle(model: ToyModel, src: list[int], config: DecodeConfig) -> list[tuple[list[int], float, float]]:
    """Every output the rules allow, as (tokens, score, raw score), best first, by exhaustive enumeration."""
    limit = max(1, int(config.max_len_a * len(src) + config.max_len_b))
    source, mask = batch_of([src], device=model.device)
    found = []

    def extend(prefix: list[int], state: object, raw: float) -> None:
        log_probs, state = model.step(torch.tensor([prefix[-1] if prefix else BOS_ID], device=model.device), state)
        length = len(prefix) + 1
        for token, log_prob in enumerate(log_probs[0].tolist()):
            if token in (PAD_ID, BOS_ID) or (token == UNK_ID and config.ban_unk):
                continue
            total = raw + log_prob
            if token == EOS_ID and (length >= config.min_len or length == limit):
                found.append((prefix + [token], total / penalty(length, config), total))
            elif token != EOS_ID and length < limit:
                extend(prefix + [token], state, total)

    extend([], model.init_state(model.encode(source, mask), mask), 0.0)
    return sorted(found, key=lambda item: -item[1])


def flat(hyps: list[list[Hypothesis]]) -> list[list[tuple[list[int], float, float]]]:
    return [[(h.tokens, h.score, h.raw_score) for h in sentence] for sentence in hyps]


def assert_same(got: list[Hypothesis], expected: list[tuple[list[int], float, float]]) -> None:
    assert [h.tokens for h in got] == [tokens for tokens, _, _ in expected]
    for h, (_, score, raw) in zip(got, expected, strict=True):
        assert h.score == pytest.approx(score, abs=1e-5) and h.raw_score == pytest.approx(raw, abs=1e-5)


def assert_same_outputs(got: list[list[Hypothesis]], expected: list[list[Hypothesis]], device: str) -> None:
    """The same hypotheses from batches of different shapes: bitwise on the CPU, where a row's
    reductions do not depend on the batch; on CUDA the same tokens with scores to 1e-5, since
    its kernels may reduce a row in another order in a batch of another shape."""
    if device == "cpu":
        assert got == expected
        return
    assert len(got) == len(expected)
    for hyps, truth in zip(got, flat(expected), strict=True):
        assert_same(hyps, truth)


PENALTY_GRID = [(alpha, form) for alpha in (0.0, 0.6, 2.0) for form in ("gnmt", "average")]


@pytest.mark.parametrize(("alpha", "form"), PENALTY_GRID)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_matches_exhaustive_oracle(alpha: float, form: str, seed: int, device: str) -> None:
    # vocabulary 5: UNK, EOS and token 4 can be produced; at most 4 output tokens
    model = ToyModel(vocab=5, seed=seed, scale=1.5, device=device)
    sentences = [[4], [4, 4], [4, 4, 4]]  # limits 2, 3, 4
    src, mask = batch_of(sentences, device=device)
    base = DecodeConfig(alpha=alpha, length_penalty=form, max_len_a=1.0, max_len_b=1)
    for options in ({}, {"min_len": 3}, {"ban_unk": True}):
        config = replace(base, **options)
        truths = [oracle(model, s, config) for s in sentences]
        # 12 beams keep every candidate of every step (at most 4 live prefixes x 3 tokens): search is exact
        for beam in (12, 16):
            got = beam_search(model, src, mask, replace(config, beam=beam, nbest=5))
            for hyps, truth in zip(got, truths, strict=True):
                assert_same(hyps, truth[:5])
        for beam in (1, 2, 3, 5):
            got = beam_search(model, src, mask, replace(config, beam=beam, nbest=min(beam, 3)))
            for _src_tokens, hyps, truth in zip(sentences, got, truths, strict=True):
                scored = {tuple(tokens): (score, raw) for tokens, score, raw in truth}
                assert hyps and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
                assert hyps[0].score <= truth[0][1] + 1e-6
                for h in hyps:
                    assert (h.score, h.raw_score) == pytest.approx(scored[tuple(h.tokens)], abs=1e-5)


def scripted(device: str) -> ScriptedModel:
    """[EOS] has probability .55; [A, B, EOS] has .45 * .9 * .9 = .3645 but is longer."""
    return ScriptedModel(
        table={
            (): {EOS_ID: 0.55, A: 0.45},
            (A,): {B: 0.9, EOS_ID: 0.06, A: 0.04},
            (A, B): {EOS_ID: 0.9, A: 0.05, B: 0.05},
        },
        default={EOS_ID: 1 / 3, A: 1 / 3, B: 1 / 3},
        device=device,
    )


@pytest.mark.parametrize(
    ("alpha", "form", "expected"),
    [
        (0.0, "gnmt", [EOS_ID]),
        (0.6, "gnmt", [EOS_ID]),  # -0.598 / 1 beats -1.009 / 1.188
        (2.0, "gnmt", [A, B, EOS_ID]),  # -1.009 / 1.778 = -0.568 beats -0.598
        (0.6, "average", [A, B, EOS_ID]),  # -1.009 / 3 ** 0.6 = -0.522
    ],
)
def test_length_penalty_decides_between_short_and_long(alpha: float, form: str, expected: list[int],
                                                       device: str) -> None:
    model = scripted(device)
    src, mask = batch_of([[A]], device=device)
    config = DecodeConfig(beam=2, nbest=1, alpha=alpha, length_penalty=form, max_len_a=0.0, max_len_b=6)
    (best,) = beam_search(model, src, mask, config)[0]
    raw = math.log(0.55) if expected == [EOS_ID] else math.log(0.45 * 0.9 * 0.9)
    assert best.tokens == expected
    assert best.raw_score == pytest.approx(raw, abs=1e-5)
    assert best.score == pytest.approx(raw / penalty(len(expected), config), abs=1e-5)
    # greedy takes EOS first whatever the penalty; early stopping quits once 2 hypotheses ([EOS], [A, EOS]) ended
    assert greedy_search(model, src, mask, config)[0][0].tokens == [EOS_ID]
    assert beam_search(model, src, mask, replace(config, early_stop=True))[0][0].tokens == [EOS_ID]


def test_stopping_waits_for_a_long_winner(device: str) -> None:
    # after [A, A] (raw -1.156) the bound at the next length, -1.156 / lp(3) = -0.650, is below [EOS]'s -0.598,
    # but the limit is 8 and [A, A, A, A, EOS] ends at -1.310 / lp(5) = -0.472: only the bound at the limit is safe
    model = ScriptedModel(
        table={
            (): {EOS_ID: 0.55, A: 0.45},
            (A,): {A: 0.7, EOS_ID: 0.2, B: 0.1},
            (A, A): {A: 0.95, EOS_ID: 0.05},
            (A, A, A): {A: 0.95, EOS_ID: 0.05},
            (A, A, A, A): {EOS_ID: 0.95, A: 0.05},
        },
        default={EOS_ID: 1 / 3, A: 1 / 3, B: 1 / 3},
        device=device,
    )
    src, mask = batch_of([[A]], device=device)
    config = DecodeConfig(beam=2, nbest=1, alpha=2.0, max_len_a=0.0, max_len_b=8)
    (best,) = beam_search(model, src, mask, config)[0]
    assert best.tokens == [A, A, A, A, EOS_ID]
    assert best.score == pytest.approx(math.log(0.45 * 0.7 * 0.95**3) / penalty(5, config), abs=1e-5)
    assert oracle(model, [A], config)[0][0] == best.tokens


@pytest.mark.parametrize(("alpha", "form"), PENALTY_GRID)
def test_nbest_one_is_the_top_of_nbest_five(alpha: float, form: str, device: str) -> None:
    model = ToyModel(vocab=12, seed=3, scale=1.0, device=device)
    src, mask = batch_of(random_sentences(8, 12, seed=4), device=device)
    config = DecodeConfig(beam=5, alpha=alpha, length_penalty=form, max_len_a=1.2, max_len_b=3)
    one = beam_search(model, src, mask, replace(config, nbest=1))
    five = beam_search(model, src, mask, replace(config, nbest=5))
    assert [len(hyps) for hyps in one] == [1] * 8 and [len(hyps) for hyps in five] == [5] * 8
    assert_same_outputs([hyps[:1] for hyps in one], [hyps[:1] for hyps in five], device)


@pytest.mark.parametrize(("alpha", "form"), PENALTY_GRID)
def test_beam_of_one_equals_greedy(alpha: float, form: str, device: str) -> None:
    model = ToyModel(vocab=12, seed=5, scale=1.0, device=device)
    src, mask = batch_of(random_sentences(8, 12, seed=6), device=device)
    for options in ({}, {"min_len": 4, "ban_unk": True}):
        config = DecodeConfig(beam=1, nbest=1, alpha=alpha, length_penalty=form, max_len_a=1.0, max_len_b=4, **options)
        greedy = greedy_search(model, src, mask, config)
        assert_same_outputs(beam_search(model, src, mask, config), greedy, device)
        assert search(model, src, mask, config) == greedy  # the same computation: exact on every device
        assert len({len(hyps[0].tokens) for hyps in greedy}) > 2  # outputs of varied lengths


def test_batch_invariance_greedy_and_beam(device: str) -> None:
    model = ToyModel(vocab=12, seed=7, scale=1.0, bias={EOS_ID: -1.0}, device=device)
    sentences = random_sentences(9, 12, seed=8, longest=9)
    model.finish_immediately(sentences[0])
    order = list(range(len(sentences)))
    random.Random(9).shuffle(order)
    src, mask = batch_of([sentences[i] for i in order], extra_pad=3, device=device)
    for config in (
        DecodeConfig(beam=1, nbest=1, max_len_a=1.0, max_len_b=3),
        DecodeConfig(beam=4, nbest=1, max_len_a=1.0, max_len_b=3, alpha=1.0),
        DecodeConfig(beam=4, nbest=3, max_len_a=1.5, max_len_b=2, length_penalty="average"),
        DecodeConfig(beam=3, nbest=2, max_len_a=1.0, max_len_b=3, early_stop=True),
    ):
        batched = search(model, src, mask, config)
        alone = [search(model, *batch_of([s], device=device), config)[0] for s in sentences]
        assert_same_outputs([batched[order.index(i)] for i in range(len(sentences))], alone, device)
        assert alone[0][0].tokens == [EOS_ID]
        assert max(len(hyps[0].tokens) for hyps in alone) > 5


def test_max_length_per_sentence_and_forced_eos(device: str) -> None:
    model = ToyModel(vocab=9, seed=10, bias={EOS_ID: -30.0}, device=device)  # EOS is never wanted
    sentences = [[4], [5, 6, 7], [4, 5, 6, 7, 8, 4], [8, 8]]
    src, mask = batch_of(sentences, extra_pad=2, device=device)
    config = DecodeConfig(nbest=2, max_len_a=1.5, max_len_b=2)
    limits = [int(1.5 * len(s) + 2) for s in sentences]
    assert limits == [3, 6, 11, 5]
    assert max_output_lengths(mask, config, None).tolist() == limits
    assert max_output_lengths(mask, config, 4).tolist() == [3, 4, 4, 4]
    assert max_output_lengths(mask, replace(config, max_len_a=0.0, max_len_b=0), None).tolist() == [1] * 4
    for options in ({"beam": 1, "nbest": 1}, {"beam": 3}, {"sampling": True, "nbest": 3}):
        run = replace(config, **options)
        for hyps, sentence, limit in zip(search(model, src, mask, run), sentences, limits, strict=True):
            assert len(hyps) == run.nbest
            for h in hyps:
                assert len(h.tokens) == limit and h.tokens[-1] == EOS_ID and EOS_ID not in h.tokens[:-1]
                assert h.raw_score == pytest.approx(raw_score(model, sentence, h.tokens), abs=1e-4)
                assert h.raw_score < -30  # the forced EOS is scored
    capped = ToyModel(vocab=9, seed=10, bias={EOS_ID: -30.0}, max_positions=4, device=device)
    assert [len(h[0].tokens) for h in search(capped, src, mask, config)] == [3, 4, 4, 4]


def test_specials_min_len_and_ban_unk(device: str) -> None:
    # the model prefers PAD, BOS and UNK, then EOS, to every ordinary token
    model = ToyModel(vocab=10, seed=11, bias={PAD_ID: 12.0, BOS_ID: 12.0, UNK_ID: 12.0, EOS_ID: 8.0}, device=device)
    src, mask = batch_of(random_sentences(5, 10, seed=12), device=device)
    for options in ({"beam": 1, "nbest": 1}, {"beam": 4, "nbest": 3}, {"sampling": True, "nbest": 3}):
        config = DecodeConfig(max_len_a=1.0, max_len_b=5, **options)
        plain = [h for hyps in search(model, src, mask, config) for h in hyps]
        assert any(UNK_ID in h.tokens for h in plain)
        restricted = [h for hyps in search(model, src, mask, replace(config, ban_unk=True, min_len=4)) for h in hyps]
        assert len(restricted) == 5 * config.nbest
        for h in plain + restricted:
            assert PAD_ID not in h.tokens and BOS_ID not in h.tokens
            assert h.tokens[-1] == EOS_ID and h.tokens.count(EOS_ID) == 1  # never extended after EOS
        assert all(UNK_ID not in h.tokens and len(h.tokens) >= 4 for h in restricted)
        if not config.sampling:  # without min_len, the best output is EOS alone
            best = [hyps[0].tokens for hyps in search(model, src, mask, replace(config, ban_unk=True))]
            assert best == [[EOS_ID]] * 5


def test_beam_reorders_state_once_per_step(device: str) -> None:
    model = ToyModel(vocab=12, seed=13, scale=1.0, device=device)
    src, mask = batch_of(random_sentences(6, 12, seed=14), device=device)
    beam_search(model, src, mask, DecodeConfig(beam=4, nbest=2, max_len_a=1.0, max_len_b=3))
    assert 0 < model.reorders <= model.steps <= 9
    assert 0 < model.within < model.reorders  # back-pointer steps keep the sentences; some leave


def test_sampling_seeded_and_truncated(device: str) -> None:
    model = ToyModel(vocab=12, seed=15, scale=0.5, device=device)
    sentences = random_sentences(4, 12, seed=16)
    src, mask = batch_of(sentences, device=device)
    config = DecodeConfig(sampling=True, nbest=3, max_len_a=1.0, max_len_b=4, seed=1)
    first = search(model, src, mask, config)
    assert search(model, src, mask, config) == first
    assert search(model, src, mask, replace(config, seed=2)) != first
    for hyps in first:
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    greedy = search(model, src, mask, DecodeConfig(beam=1, max_len_a=1.0, max_len_b=4))
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        assert search(model, src, mask, replace(config, nbest=1, **options)) == greedy
    top2 = search(model, src, mask, replace(config, top_k=2, temperature=2.0))
    nucleus = search(model, src, mask, replace(config, top_p=0.5))
    for sentence, hyps_k, hyps_p in zip(sentences, top2, nucleus, strict=True):
        limit = len(sentence) + 4  # where EOS is forced, whatever its rank
        for h in hyps_k:  # every token among the two most probable (of those allowed)
            for lp, token in list(zip(replay(model, sentence, h.tokens), h.tokens, strict=False))[: limit - 1]:
                lp[[PAD_ID, BOS_ID]] = -math.inf
                assert lp[token] >= lp.topk(2).values[-1]
        for h in hyps_p:  # every token inside the smallest set holding half the probability
            for lp, token in list(zip(replay(model, sentence, h.tokens), h.tokens, strict=False))[: limit - 1]:
                lp[[PAD_ID, BOS_ID]] = -math.inf
                probs = lp.softmax(0)
                assert probs[probs > probs[token]].sum() < 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beam": 2, "nbest": 3}, "nbest 3 is larger than the beam size 2"),
        ({"beam": 0}, "beam size must be at least 1"),
        ({"length_penalty": "wu"}, "unknown length penalty 'wu'"),
        ({"sampling": True, "temperature": 0.0}, "temperature must be a finite positive number, got 0.0"),
        ({"sampling": True, "temperature": float("nan")}, "temperature must be a finite positive number, got nan"),
        ({"sampling": True, "temperature": float("inf")}, "temperature must be a finite positive number, got inf"),
        ({"alpha": float("nan")}, r"alpha \(the length penalty exponent\) must be in \[0, 10\], got nan"),
        ({"alpha": float("inf")}, "alpha .* got inf"),
        ({"alpha": -0.5}, "alpha .* got -0.5"),
        ({"alpha": 10.5}, r"alpha \(the length penalty exponent\) must be in \[0, 10\], got 10.5"),
        ({"max_len_b": -5}, "max-len-a and max-len-b must be >= 0 .* got 1.5 and -5"),
        ({"max_len_a": -1.0}, "max-len-a and max-len-b must be >= 0"),
        ({"max_len_a": 0.0, "max_len_b": 0}, "max-len-b must be at least 1 when max-len-a is 0"),
        ({"min_len": -1}, "min-len must be >= 0, got -1"),
        ({"sampling": True, "top_p": float("nan")}, r"top-p must be in \(0, 1\]"),
        ({"sampling": True, "top_p": 0.0}, r"top-p must be in \(0, 1\]"),
        ({"sampling": True, "top_k": -1}, "top-k must be"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    src, mask = batch_of([[4, 5]])
    with pytest.raises(NmtError, match=message):
        search(ToyModel(vocab=6), src, mask, DecodeConfig(**options))


def test_penalties_and_length_limits_never_overflow() -> None:
    """Whatever a DecodeConfig holds (the options are checked before search, this is the last defence):
    the penalty stays a finite float32, and a huge max_len_a does not wrap around to an empty output."""
    assert length_penalty(10**6, DecodeConfig(alpha=1e308, length_penalty="average")) == torch.finfo().max
    assert length_penalty(1000, DecodeConfig(alpha=MAX_ALPHA)) == pytest.approx((1005 / 6) ** MAX_ALPHA)
    _, mask = batch_of([[4, 5, 6]])
    assert max_output_lengths(mask, DecodeConfig(max_len_a=1e300), None).tolist() == [1 << 20]
    assert max_output_lengths(mask, DecodeConfig(max_len_a=1e300), 64).tolist() == [64]


@pytest.fixture(params=[("transformer", 1.0), ("transformer", 2.0), ("lstm", 1.0), ("lstm", 2.0), ("gru", 2.0),
                        ("rnn", 2.0)])
def real_model(request: pytest.FixtureRequest, device: str) -> torch.nn.Module:
    """A small random model of each architecture, in eval mode, built on the CPU and moved to `device`;
    random models run to the length limit unless the EOS output row is scaled up (x2 gives a mix of
    short and long outputs)."""
    from nmt.config import ModelConfig
    from nmt.models import build_model

    torch.manual_seed(17)
    arch, cell = ("transformer", "lstm") if request.param[0] == "transformer" else ("rnn", request.param[0])
    config = ModelConfig(
        arch=arch, cell=cell, src_vocab_size=40, tgt_vocab_size=40, joint_vocab=True, enc_layers=2, dec_layers=2,
        d_model=32, heads=4, ffn_dim=64, embed_dim=32, hidden_size=32, max_positions=64,
    )
    model = build_model(config).eval()
    with torch.no_grad():
        model.output.weight[EOS_ID] *= request.param[1]
    return model.to(device)


def teacher_forced(model: torch.nn.Module, src: Tensor, mask: Tensor, hyps: list[list[Hypothesis]]) -> list[float]:
    """Sum of log_softmax(forward) at each hypothesis's tokens, one forward pass for all of them."""
    rows = [i for i, sentence in enumerate(hyps) for _ in sentence]
    outputs = [h.tokens for sentence in hyps for h in sentence]
    tgt_in = torch.full((len(outputs), max(map(len, outputs))), PAD_ID)
    tgt_out = torch.full_like(tgt_in, PAD_ID)
    for i, tokens in enumerate(outputs):
        tgt_in[i, : len(tokens)] = torch.tensor([BOS_ID, *tokens[:-1]])
        tgt_out[i, : len(tokens)] = torch.tensor(tokens)
    tgt_in, tgt_out = tgt_in.to(src.device), tgt_out.to(src.device)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(src[rows], mask[rows], tgt_in).float(), -1)  # (N, T, V)
    picked = log_probs.gather(2, tgt_out.unsqueeze(2)).squeeze(2)  # (N, T)
    return picked.masked_fill(tgt_out == PAD_ID, 0.0).sum(1).tolist()


def test_real_models_beam_of_one_equals_greedy_and_scores_are_teacher_forced(real_model: torch.nn.Module,
                                                                            device: str) -> None:
    sentences = random_sentences(6, 40, seed=18, longest=8)
    src, mask = batch_of(sentences, extra_pad=1, device=device)
    config = DecodeConfig(beam=1, nbest=1, alpha=0.6, max_len_a=1.0, max_len_b=5)
    greedy = greedy_search(real_model, src, mask, config)
    # the same batch shapes, but beam search reorders the cached states every step: on CUDA, another
    # memory layout may take another kernel
    assert_same_outputs(beam_search(real_model, src, mask, config), greedy, device)
    beam = beam_search(real_model, src, mask, replace(config, beam=4, nbest=3, length_penalty="average", alpha=1.0))
    for hyps, run in ((greedy, config), (beam, replace(config, length_penalty="average", alpha=1.0))):
        raws = teacher_forced(real_model, src, mask, hyps)
        for h, raw in zip([h for sentence in hyps for h in sentence], raws, strict=True):
            assert h.raw_score == pytest.approx(raw, abs=1e-4)
            assert h.score == pytest.approx(raw / penalty(len(h.tokens), run), abs=1e-4)
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = search(real_model, src, mask, replace(config, beam=3))
    assert all(h.tokens[-1] == EOS_ID and math.isfinite(h.score) for hyps in mixed for h in hyps)
