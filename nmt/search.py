"""Greedy search, beam search and sampling, written once against the model interface.

Conventions shared by every strategy, so that their results compare exactly:

- A hypothesis's tokens exclude BOS and always end with EOS. A hypothesis still
  unfinished at its sentence's length limit is given EOS there (scored with the
  model's log-probability of EOS at that position).
- Every length counts the EOS token, which is a real output decision: in the
  length penalty, in the limit `max_len_a * src_len + max_len_b` and in `min_len`.
- `raw_score` is the sum of the model's token log-probabilities (not renormalised
  after masking); `score = raw_score / lp(length)` with lp = ((5 + length) / 6) ** alpha
  ("gnmt") or length ** alpha ("average").
- PAD and BOS are never produced, nor UNK under `ban_unk`, nor EOS before `min_len`.
- A sentence's length limit depends only on its own number of real source positions
  and the model's `max_positions`, so greedy and beam search translate a sentence the
  same alone or in any batch. Sampling draws from one seeded stream for the batch.
- The host reads the device only every `sync_every` steps (`sync_interval`): then
  finished sentences leave the batch. Between those reads a finished sentence rides
  along and what it does after it finished is not kept, so the output does not depend on
  the interval (greedy and beam; sampling reads every step, as its draws depend on
  which rows are live).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from nmt.config import DecodeConfig
from nmt.decode_options import check_options, length_penalty, max_output_lengths
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

NEG_INF = float("-inf")


def sync_interval(device: torch.device) -> int:
    """Steps between the search's host reads. On a CPU a read costs nothing and every finished
    sentence that leaves at once saves work: 1. On a GPU each read stalls the queue of kernels: 8."""
    return 1 if device.type == "cpu" else 8


class Decoder(Protocol):
    """What search needs from a model (see the model interface in nmt.models)."""

    max_positions: int | None

    def encode(self, src: Tensor, src_mask: Tensor) -> Any: ...

    def init_state(self, memory: Any, src_mask: Tensor, keep_attention: bool = False,
                   keep_heads: bool = False) -> Any: ...

    def step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]: ...

    def reorder_state(self, state: Any, rows: Tensor, sentences: Tensor | None = None) -> Any:
        """The state of the new rows: `rows` the old row of each; `sentences` the old index of each new
        sentence, None when the sentences stay. A sentence's rows are side by side, as many for each."""


@dataclass(frozen=True)
class Hypothesis:
    """One output: `tokens` without BOS, ending with EOS; `score` is length-normalised."""

    tokens: list[int]
    score: float
    raw_score: float

    @property
    def length(self) -> int:
        return len(self.tokens)


@torch.inference_mode()
def search(model: Decoder, src: Tensor, src_mask: Tensor, config: DecodeConfig) -> list[list[Hypothesis]]:
    """Translate a batch (src (B, S), src_mask (B, S) True at real tokens): per sentence, best first."""
    if config.sampling:
        return sample_search(model, src, src_mask, config)
    if config.beam == 1:
        return greedy_search(model, src, src_mask, config)
    return beam_search(model, src, src_mask, config)


@torch.inference_mode()
def greedy_search(model: Decoder, src: Tensor, src_mask: Tensor, config: DecodeConfig,
                  sync_every: int | None = None) -> list[list[Hypothesis]]:
    """The most probable token at every step: the same result as a beam of one, with less bookkeeping."""
    state, max_len = _start(model, src, src_mask, config)
    every = sync_every or sync_interval(src.device)
    # max gives the first of equal maxima, as argmax and topk do, and its log-prob with it
    return _decode_rows(model, state, max_len, config, 1, lambda log_probs: log_probs.max(1), every)


@torch.inference_mode()
def sample_search(model: Decoder, src: Tensor, src_mask: Tensor, config: DecodeConfig) -> list[list[Hypothesis]]:
    """`nbest` independent samples per sentence (temperature, top-k, top-p), seeded by `config.seed`.

    Samples are ranked by the model's score, like beam hypotheses. The draws come
    from one generator for the whole batch, so they depend on the batch's composition.
    """
    state, max_len = _start(model, src, src_mask, config)
    generator = torch.Generator(device=src.device).manual_seed(config.seed)

    def draw(log_probs: Tensor) -> tuple[Tensor, Tensor]:
        logits = _truncate(log_probs / config.temperature, config.top_k, config.top_p)  # (R, V)
        drawn = torch.multinomial(logits.softmax(1), 1, generator=generator)  # (R, 1)
        return log_probs.gather(1, drawn).squeeze(1), drawn.squeeze(1)

    return _decode_rows(model, state, max_len, config, config.nbest, draw, sync_every=1)


@torch.inference_mode()
def beam_search(model: Decoder, src: Tensor, src_mask: Tensor, config: DecodeConfig,
                sync_every: int | None = None) -> list[list[Hypothesis]]:
    """Beam search over all sentences and beams at once, with an exact stopping rule.

    Each step keeps the `beam` best extensions of a sentence's live beams; those
    ending in EOS finish and leave the beam. A sentence stops when no live beam can
    still beat the worst of its `nbest` best finished hypotheses: a live raw score
    r <= 0 can only fall, so its best reachable score is r / max lp over the lengths
    it may still reach, which is lp at the sentence's limit (lp never falls with the
    length). Hence `nbest` 1 and the top of a longer n-best list agree. `early_stop`
    instead stops a sentence once `beam` hypotheses finished (faster, inexact).
    Finished sentences leave the batch. Only the scores of the best finished hypotheses
    are kept per step; the hypotheses themselves are ranked once, at the end.
    """
    state, max_len = _start(model, src, src_mask, config)
    beam, device = config.beam, max_len.device
    every, limit = sync_every or sync_interval(device), int(max_len.max())
    lp = _penalty_table(limit, config, device)  # (T+2,)
    live = _Live.start(max_len, lp)
    scores = torch.zeros(len(max_len), 1, device=device)  # (N, W) raw scores of the live beams
    tokens = torch.full((len(max_len), limit), PAD_ID, device=device)  # (N*W, T)
    last = torch.full((len(max_len),), BOS_ID, device=device)  # (N*W,)
    best = torch.full((len(max_len), config.nbest), NEG_INF, device=device)  # (N, n) best finished scores
    finished = _Finished()
    shortest = int(max_len.min())  # no row is at its limit before this step: _mask need not look
    for step in range(limit):
        live_count, width = scores.shape
        log_probs, state = model.step(last, state)  # (N*W, V)
        at_limit = live.max_len.repeat_interleave(width) if step + 1 >= shortest else None
        log_probs = _mask(log_probs, step, at_limit, config, sync_free=every > 1)
        top, origin, token = _best_extensions(log_probs, scores, beam)  # (N, K) each
        rows, last = origin.view(-1), token.view(-1)  # (N*K,)
        tokens = tokens[rows]  # (N*K, T) a new tensor each step: `finished` may hold it until the next read
        tokens[:, step] = last
        ended = (token == EOS_ID) & top.isfinite()  # (N, K)
        if every > 1 or ended.any():  # reading every step, skip this when nothing ended (most steps)
            normalised = torch.where(ended, top / lp[step + 1], NEG_INF)
            best = torch.cat([best, normalised], 1).topk(config.nbest, dim=1).values
            fresh = ended & ~live.done.unsqueeze(1) if every > 1 else ended  # done sentences finish no more
            finished.add(live.sentence, torch.where(fresh, top, NEG_INF), tokens)
        alive = top.masked_fill(ended, NEG_INF)  # (N, K)
        live = live.after_step(ended, alive, best, beam if config.early_stop else None, every > 1)
        sentences = None  # the same sentences (with new back-pointers), unless some leave below
        reading = (step + 1) % every == 0
        if reading:  # the host read: the rows that ended are kept, done sentences leave
            finished.compact()
        if reading and live.done.any():
            keep = (~live.done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            live, best, sentences = live.select(keep), best[keep], keep
            shortest = int(live.max_len.min())
            rows, alive, last = origin[keep].view(-1), alive[keep], token[keep].view(-1)
            tokens = tokens.view(live_count, -1, limit)[keep].view(-1, limit)
        state = model.reorder_state(state, rows, sentences)
        scores = alive
    return finished.ranked(len(max_len), config)


class _Live(NamedTuple):
    """Per sentence still in the batch: its index, limit, lp at that limit, hypotheses finished so far
    (counted for `early_stop` only), and whether it is done (it rides along until the next host read)."""

    sentence: Tensor  # (N,) batch index
    max_len: Tensor  # (N,)
    lp_limit: Tensor  # (N,)
    finished: Tensor  # (N,) long
    done: Tensor  # (N,) bool

    @classmethod
    def start(cls, max_len: Tensor, lp: Tensor) -> _Live:
        batch, device = len(max_len), max_len.device
        return cls(torch.arange(batch, device=device), max_len, lp[max_len],
                   torch.zeros(batch, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.bool, device=device))

    def after_step(self, ended: Tensor, alive: Tensor, best: Tensor, early: int | None, rides: bool) -> _Live:
        """Done: no live beam can still beat the worst of a full n-best list (or, early, `early` hypotheses
        ended). At its limit a sentence has no live beam left, so it is done; before, lp at the limit is
        the largest it can reach. Without `rides` no done sentence is still in the batch."""
        done = alive.amax(1) / self.lp_limit <= best[:, -1]  # (N,)
        finished = self.finished
        if early is not None:
            finished = finished + ended.sum(1)
            done |= finished >= early
        return self._replace(finished=finished, done=self.done | done if rides else done)

    def select(self, keep: Tensor) -> _Live:
        return _Live(*(values[keep] for values in self))


class _Finished:
    """The hypotheses that ended so far. A step's extensions wait as they are, all (N*K, T) of them, only
    until the next host read, which keeps the rows that ended: memory grows with the hypotheses, not with
    steps x beams x length."""

    def __init__(self) -> None:
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (N,) sentence, (N, K) raw or -inf, (N*K, T)
        self.sentence: list[Tensor] = []  # (M,) each, in the order they ended (step, then beam within a step)
        self.raw: list[Tensor] = []  # (M,)
        self.tokens: list[Tensor] = []  # (M, T)

    def add(self, sentence: Tensor, raw: Tensor, tokens: Tensor) -> None:
        """One step's extensions: `raw` is -inf where an extension did not end (or should not be kept)."""
        self.pending.append((sentence, raw, tokens))

    def compact(self) -> None:
        """Keep only the rows that ended (a host read per pending step)."""
        for sentence, raw, tokens in self.pending:
            ended = raw.view(-1).isfinite().nonzero().squeeze(1)  # row-major: sentence, then beam
            self.sentence.append(sentence[ended // raw.size(1)])
            self.raw.append(raw.view(-1)[ended])
            self.tokens.append(tokens[ended])
        self.pending.clear()

    def ranked(self, batch: int, config: DecodeConfig) -> list[list[Hypothesis]]:
        """Each sentence's `nbest` best hypotheses, in the order they ended where scores tie."""
        self.compact()
        if not self.raw:  # no extension ever ended (a model that never lets EOS through)
            return [[] for _ in range(batch)]
        sentence, raw, tokens = torch.cat(self.sentence), torch.cat(self.raw), torch.cat(self.tokens)
        order = sentence.sort(stable=True).indices  # by sentence, in the order they ended within one
        sentence, raw, tokens = sentence[order], raw[order], tokens[order]
        counts = torch.bincount(sentence, minlength=batch)  # (B,)
        slot = torch.arange(len(sentence), device=sentence.device) - (counts.cumsum(0) - counts)[sentence]
        width = int(counts.max())
        raw_all = raw.new_full((batch, width), NEG_INF).index_put_((sentence, slot), raw)  # (B, M)
        tokens_all = tokens.new_full((batch, width, tokens.size(1)), PAD_ID).index_put_((sentence, slot), tokens)
        length = ((tokens_all == EOS_ID).int().argmax(2) + 1).masked_fill(raw_all.isinf(), 0)  # ends at EOS
        return _hypotheses(tokens_all, raw_all, length, config, config.nbest)


def _best_extensions(log_probs: Tensor, scores: Tensor, beam: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `beam` best extensions of each sentence's live beams: raw scores, source rows and tokens, (N, K) each.

    log_probs (N*W, V) are this step's, scores (N, W) the beams' so far; the K best extensions of a
    sentence are among the K best of each of its beams, so only those are ranked.
    """
    live_count, width = scores.shape
    best, best_token = log_probs.topk(min(beam, log_probs.size(1)), dim=1)  # (N*W, k)
    per_beam = best.size(1)
    candidates = (scores.unsqueeze(2) + best.view(live_count, width, per_beam)).view(live_count, -1)
    top, index = candidates.topk(min(beam, width * per_beam), dim=1)  # (N, K)
    origin = _candidate_rows(live_count, width, per_beam, scores.device).gather(1, index)  # (N, K)
    return top, origin, best_token.view(live_count, -1).gather(1, index)


@functools.lru_cache(maxsize=64)
def _candidate_rows(live_count: int, width: int, per_beam: int, device: torch.device) -> Tensor:
    """(N, W*k): the row of the N*W beams that each candidate extends; made once per shape."""
    return torch.arange(live_count * width, device=device).repeat_interleave(per_beam).view(live_count, -1)


def _start(model: Decoder, src: Tensor, src_mask: Tensor, config: DecodeConfig) -> tuple[Any, Tensor]:
    """Check the options, encode once, and give the fresh state with each sentence's length limit."""
    check_options(config)
    state = model.init_state(model.encode(src, src_mask), src_mask)
    return state, max_output_lengths(src_mask, config, model.max_positions)


def _penalty_table(longest: int, config: DecodeConfig, device: torch.device) -> Tensor:
    """lp(0..longest + 1) as float32 (lp(0) is never used by a real hypothesis)."""
    values = [length_penalty(length, config) if length else 1.0 for length in range(longest + 2)]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _mask(log_probs: Tensor, step: int, max_len: Tensor | None, config: DecodeConfig,
          sync_free: bool = False) -> Tensor:
    """Forbid, in place, what may not be output position `step + 1`; rows at their limit may only end.

    log_probs (R, V) is the step's fresh output; max_len (R,) the limit of each row, or None when the
    caller knows that no row is at its limit yet (which saves comparing limits, a host sync, every step).
    `sync_free` masks rows at their limit over the whole array instead of finding them (a host read).
    """
    banned = _banned(config.ban_unk, max_len is None and step + 1 < config.min_len, log_probs.device)
    log_probs.index_fill_(1, banned, NEG_INF)  # columns only: a pass over all of (R, V) would cost more
    if max_len is None:
        return log_probs
    at_limit = max_len == step + 1  # (R,)
    if step + 1 < config.min_len:
        log_probs[:, EOS_ID].masked_fill_(~at_limit, NEG_INF)
    if sync_free:
        eos = log_probs[:, EOS_ID].clone()
        log_probs.masked_fill_(at_limit.unsqueeze(1), NEG_INF)
        log_probs[:, EOS_ID] = eos
        return log_probs
    rows = at_limit.nonzero().squeeze(1)  # usually none: touch only those rows
    if rows.numel():
        eos = log_probs[rows, EOS_ID]
        log_probs[rows] = NEG_INF
        log_probs[rows, EOS_ID] = eos
    return log_probs


@functools.lru_cache(maxsize=16)
def _banned(ban_unk: bool, ban_eos: bool, device: torch.device) -> Tensor:
    """The ids a step may not output, made once per device (a list would be copied to the device each step)."""
    ids = [PAD_ID, BOS_ID] + [UNK_ID] * ban_unk + [EOS_ID] * ban_eos
    return torch.tensor(ids, device=device)


def _truncate(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top-p (others -inf)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(1)), dim=1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        ordered, order = logits.sort(1, descending=True)  # (R, V)
        probs = ordered.softmax(1)
        beyond = probs.cumsum(1) - probs >= top_p  # mass before this token already reached p
        logits = logits.masked_fill(beyond.scatter(1, order, beyond), NEG_INF)
    return logits


def _decode_rows(model: Decoder, state: Any, max_len: Tensor, config: DecodeConfig, rows: int,
                 choose: Callable[[Tensor], tuple[Tensor, Tensor]], sync_every: int) -> list[list[Hypothesis]]:
    """Extend `rows` independent hypotheses per sentence by one chosen token per step until EOS.

    `choose` gives each row's token and its log-prob. Tokens and scores are written straight into the
    output rows (time-major, so a step writes one row of `out`): an ended row has nothing to copy.
    """
    batch, device = max_len.numel(), max_len.device
    if rows > 1:
        expand = torch.arange(batch, device=device).repeat_interleave(rows)  # (B*rows,)
        state, max_len = model.reorder_state(state, expand, expand), max_len[expand]  # a row each: any may leave
    total, limit = batch * rows, int(max_len.max())
    origin = torch.arange(total, device=device)  # (R,) output row of each live row
    out = torch.full((limit, total), PAD_ID, device=device)  # (T, B*rows)
    raw = torch.zeros(total, device=device)  # (B*rows,)
    last = torch.full((total,), BOS_ID, device=device)  # (R,)
    stopped = torch.zeros(total, dtype=torch.bool, device=device)  # (R,) ended, riding along until the next read
    shortest = int(max_len.min())  # no row is at its limit before this step: _mask need not look
    for step in range(limit):
        log_probs, state = model.step(last, state)  # (R, V)
        log_probs = _mask(log_probs, step, max_len if step + 1 >= shortest else None, config, sync_every > 1)
        chosen, last = choose(log_probs)  # (R,) each
        out[step].index_copy_(0, origin, last)
        leaving = last == EOS_ID  # (R,) forced at each row's limit
        if sync_every > 1:  # what a row adds after its EOS is not its own; reading every step, none rides along
            chosen, leaving = chosen.masked_fill(stopped, 0.0), stopped | leaving
        raw.index_add_(0, origin, chosen)  # the same float32 sums as adding row by row
        if (step + 1) % sync_every or not leaving.any():
            stopped = leaving
            continue
        keep = (~leaving).nonzero().squeeze(1)  # the host read: ended rows leave
        if keep.numel() == 0:
            break
        state = model.reorder_state(state, keep, keep)
        max_len, origin, last, stopped = max_len[keep], origin[keep], last[keep], leaving[keep]
        shortest = int(max_len.min())
    tokens = out.t().reshape(batch, rows, limit)
    length = (tokens == EOS_ID).int().argmax(2) + 1  # up to the first EOS: every row has one
    return _hypotheses(tokens, raw.view(batch, rows), length, config)


def _hypotheses(tokens: Tensor, raw: Tensor, length: Tensor, config: DecodeConfig,
                keep: int | None = None) -> list[list[Hypothesis]]:
    """Per sentence, its `keep` (or all) hypotheses best first, the earlier first where scores tie;
    tokens (B, M, T), raw and length (B, M); length 0 = none."""
    lp = _penalty_table(tokens.size(2), config, tokens.device)
    score = (raw / lp[length]).masked_fill(length == 0, NEG_INF)  # (B, M)
    order = score.sort(dim=1, descending=True, stable=True).indices[:, :keep]  # (B, n)
    tokens = tokens.gather(1, order.unsqueeze(2).expand(-1, -1, tokens.size(2))).tolist()
    score, raw, length = (values.gather(1, order).tolist() for values in (score, raw, length))
    return [
        [Hypothesis(toks[:n], s, r) for toks, s, r, n in zip(*sentence, strict=True) if n > 0]
        for sentence in zip(tokens, score, raw, length, strict=True)
    ]
