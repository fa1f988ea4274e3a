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
  along, its results stored when it finished, so the output does not depend on
  the interval (greedy and beam; sampling reads every step, as its draws depend on
  which rows are live).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from nmt.config import MAX_ALPHA, DecodeConfig
from nmt.errors import NmtError
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

PENALTIES = ("gnmt", "average")
NEG_INF = float("-inf")
PENALTY_MAX = torch.finfo(torch.float32).max  # the penalty table is float32
MAX_OUTPUT = 1 << 20  # tokens: an output limit above this is an overflow of a * src_len + b, not a length


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

    def reorder_state(self, state: Any, index: Tensor, within_sentences: bool = False) -> Any: ...


@dataclass(frozen=True)
class Hypothesis:
    """One output: `tokens` without BOS, ending with EOS; `score` is length-normalised."""

    tokens: list[int]
    score: float
    raw_score: float

    @property
    def length(self) -> int:
        return len(self.tokens)


def length_penalty(length: int, config: DecodeConfig) -> float:
    """lp(length) that raw scores are divided by; computed in Python so it never depends on the batch."""
    base = (5.0 + length) / 6.0 if config.length_penalty == "gnmt" else float(length)
    try:  # alpha <= MAX_ALPHA keeps it finite for any real length; never an overflow, whatever it is given
        return min(base**config.alpha, PENALTY_MAX)
    except OverflowError:
        return PENALTY_MAX


def max_output_lengths(src_mask: Tensor, config: DecodeConfig, max_positions: int | None) -> Tensor:
    """Longest output of each sentence, EOS included: floor(a * src_len + b), within [1, max_positions]."""
    src_len = src_mask.sum(1).double()  # (B,) real source positions
    limit = torch.floor(config.max_len_a * src_len + config.max_len_b).clamp(max=MAX_OUTPUT).long()
    if max_positions is not None:
        limit = limit.clamp(max=max_positions)
    return limit.clamp(min=1)


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
    return _decode_rows(model, state, max_len, config, 1, lambda log_probs: log_probs.argmax(1), every)


@torch.inference_mode()
def sample_search(model: Decoder, src: Tensor, src_mask: Tensor, config: DecodeConfig) -> list[list[Hypothesis]]:
    """`nbest` independent samples per sentence (temperature, top-k, top-p), seeded by `config.seed`.

    Samples are ranked by the model's score, like beam hypotheses. The draws come
    from one generator for the whole batch, so they depend on the batch's composition.
    """
    state, max_len = _start(model, src, src_mask, config)
    generator = torch.Generator(device=src.device).manual_seed(config.seed)

    def draw(log_probs: Tensor) -> Tensor:
        logits = _truncate(log_probs / config.temperature, config.top_k, config.top_p)  # (R, V)
        return torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)

    return _decode_rows(model, state, max_len, config, config.nbest, draw, sync_every=1)


@torch.inference_mode()
def beam_search(model: Decoder, src: Tensor, src_mask: Tensor, config: DecodeConfig,
                sync_every: int | None = None) -> list[list[Hypothesis]]:
    """Beam search over all sentences and beams at once, with an exact stopping rule.

    Each step keeps the `beam` best extensions of a sentence's live beams; those
    ending in EOS join the sentence's pool of `nbest` finished hypotheses and leave
    the beam. A sentence stops when no live beam can still beat the worst of a full
    pool: a live raw score r <= 0 can only fall, so its best reachable score is
    r / max lp over the lengths it may still reach (lp is monotone in the length;
    for alpha > 0 that is lp at the sentence's limit). Hence `nbest` 1 and the top
    of a longer n-best list agree. `early_stop` instead stops a sentence once
    `beam` hypotheses finished (faster, inexact). Finished sentences leave the batch.
    """
    state, max_len = _start(model, src, src_mask, config)
    beam, nbest, device = config.beam, config.nbest, max_len.device
    every, limit = sync_every or sync_interval(device), int(max_len.max())
    lp = _penalty_table(limit, config, device)  # (T+2,)
    live = _Live.start(max_len, lp)
    scores = torch.zeros(len(max_len), 1, device=device)  # (N, W) raw scores of the live beams
    tokens = torch.full((len(max_len), limit), PAD_ID, device=device)  # (N*W, T)
    last = torch.full((len(max_len),), BOS_ID, device=device)  # (N*W,)
    pool, results = (_Finished.empty(len(max_len), nbest, limit, device) for _ in range(2))
    shortest = int(max_len.min())  # no row is at its limit before this step: _mask need not look
    for step in range(limit):
        live_count, width = scores.shape
        log_probs, state = model.step(last, state)  # (N*W, V)
        at_limit = live.max_len.repeat_interleave(width) if step + 1 >= shortest else None
        log_probs = _mask(log_probs, step, at_limit, config, sync_free=every > 1)
        top, origin, token = _best_extensions(log_probs, scores, beam)  # (N, K) each
        tokens = tokens[origin.view(-1)]  # (N*K, T)
        tokens[:, step] = token.view(-1)
        ended = (token == EOS_ID) & top.isfinite()  # (N, K)
        if every > 1 or ended.any():  # reading every step, skip the merge when nothing ended (most steps)
            new = _Finished(torch.where(ended, top / lp[step + 1], NEG_INF), top, ended.long() * (step + 1),
                            tokens.view(live_count, -1, limit))
            pool = pool.merge(new, nbest)
        alive = top.masked_fill(ended, NEG_INF)  # (N, K)
        live = live.after_step(ended, alive, pool, lp[step + 2], beam if config.early_stop else None)
        if every > 1:  # a sentence done between reads rides along: its results are stored as they are now
            results.store(live.sentence, live.newly_done, pool)
        within = origin.size(1) == width  # back-pointers only, unless sentences leave below
        if (step + 1) % every == 0 and live.done.any():  # the host read: done sentences leave
            if every == 1:  # all done sentences are newly done and leave now
                results.store(live.sentence, live.newly_done, pool)
            keep = (~live.done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            live, pool, within = live.select(keep), pool.select(keep), False
            shortest = int(live.max_len.min())
            origin, alive, token = origin[keep], alive[keep], token[keep]
            tokens = tokens.view(live_count, -1, limit)[keep].view(-1, limit)
        state = model.reorder_state(state, origin.view(-1), within_sentences=within)
        scores, last = alive, token.view(-1)
    return _hypotheses(results.tokens, results.raw, results.length, config)


class _Live(NamedTuple):
    """Per sentence still in the batch: its index, limit, lp at that limit, hypotheses finished so far,
    and whether it is done (its results stored; it rides along until the next host read)."""

    sentence: Tensor  # (N,) batch index
    max_len: Tensor  # (N,)
    lp_limit: Tensor  # (N,)
    finished: Tensor  # (N,) long
    done: Tensor  # (N,) bool
    newly_done: Tensor  # (N,) bool: done at this step

    @classmethod
    def start(cls, max_len: Tensor, lp: Tensor) -> _Live:
        batch, device = len(max_len), max_len.device
        none = torch.zeros(batch, dtype=torch.bool, device=device)
        return cls(torch.arange(batch, device=device), max_len, lp[max_len],
                   torch.zeros(batch, dtype=torch.long, device=device), none, none)

    def after_step(self, ended: Tensor, alive: Tensor, pool: _Finished, lp_next: Tensor, early: int | None) -> _Live:
        """Done: no live beam can still beat the worst of a full pool (or, early, `early` hypotheses ended)."""
        finished = self.finished + ended.sum(1)
        reachable = alive.amax(1) / torch.maximum(lp_next, self.lp_limit)  # (N,)
        done = reachable <= pool.score[:, -1]
        if early is not None:
            done |= finished >= early
        return self._replace(finished=finished, done=self.done | done, newly_done=done & ~self.done)

    def select(self, keep: Tensor) -> _Live:
        return _Live(*(values[keep] for values in self))


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
    offsets = torch.arange(live_count, device=scores.device).unsqueeze(1) * width  # (N, 1)
    origin = offsets + index.div(per_beam, rounding_mode="floor")  # (N, K) rows of the N*W beams
    return top, origin, best_token.view(live_count, -1).gather(1, index)


class _Finished(NamedTuple):
    """The best finished hypotheses of each sentence, best first; empty slots have length 0."""

    score: Tensor  # (N, n) normalised, -inf in empty slots
    raw: Tensor  # (N, n)
    length: Tensor  # (N, n)
    tokens: Tensor  # (N, n, T)

    @classmethod
    def empty(cls, batch: int, size: int, limit: int, device: torch.device) -> _Finished:
        return cls(
            score=torch.full((batch, size), NEG_INF, device=device),
            raw=torch.full((batch, size), NEG_INF, device=device),
            length=torch.zeros(batch, size, dtype=torch.long, device=device),
            tokens=torch.full((batch, size, limit), PAD_ID, device=device),
        )

    def select(self, keep: Tensor) -> _Finished:
        return _Finished(*(values[keep] for values in self))

    def store(self, rows: Tensor, where: Tensor, current: _Finished) -> None:
        """Copy `current` into `rows` of these results where `where` (N,) holds: in place, no host read."""
        for kept, fresh in zip(self, current, strict=True):
            chosen = where.view(-1, *([1] * (fresh.dim() - 1)))
            kept[rows] = torch.where(chosen, fresh, kept[rows])

    def merge(self, new: _Finished, size: int) -> _Finished:
        """The `size` best of both; on equal scores the earlier-finished hypothesis comes first."""
        score = torch.cat([self.score, new.score], 1)  # (N, n + K)
        order = score.sort(dim=1, descending=True, stable=True).indices[:, :size]  # (N, n)
        tokens = torch.cat([self.tokens, new.tokens], 1)  # (N, n + K, T)
        return _Finished(
            score=score.gather(1, order),
            raw=torch.cat([self.raw, new.raw], 1).gather(1, order),
            length=torch.cat([self.length, new.length], 1).gather(1, order),
            tokens=tokens.gather(1, order.unsqueeze(2).expand(-1, -1, tokens.size(2))),
        )


def check_options(config: DecodeConfig) -> None:
    """Reject options search cannot honour, naming the option."""
    if config.beam < 1:
        raise NmtError(f"beam size must be at least 1, got {config.beam}")
    if config.nbest < 1:
        raise NmtError(f"nbest must be at least 1, got {config.nbest}")
    if not config.sampling and config.nbest > config.beam:
        raise NmtError(f"nbest {config.nbest} is larger than the beam size {config.beam}")
    if config.length_penalty not in PENALTIES:
        raise NmtError(f"unknown length penalty {config.length_penalty!r}; choose one of {', '.join(PENALTIES)}")
    if not 0 <= config.alpha <= MAX_ALPHA:  # NaN too
        raise NmtError(f"alpha (the length penalty exponent) must be in [0, {MAX_ALPHA:g}], got {config.alpha}")
    if not (math.isfinite(config.max_len_a) and config.max_len_a >= 0) or config.max_len_b < 0:
        raise NmtError(f"max-len-a and max-len-b must be >= 0 (the output limit is a * source length + b), "
                       f"got {config.max_len_a} and {config.max_len_b}")
    if config.max_len_a == 0 and config.max_len_b < 1:
        raise NmtError("max-len-b must be at least 1 when max-len-a is 0: every output needs room for EOS")
    if config.min_len < 0:
        raise NmtError(f"min-len must be >= 0, got {config.min_len}")
    if config.sampling and not (math.isfinite(config.temperature) and config.temperature > 0):
        raise NmtError(f"sampling temperature must be a finite positive number, got {config.temperature}")
    if config.sampling and config.top_k < 0:
        raise NmtError(f"top-k must be 0 (off) or positive, got {config.top_k}")
    if config.sampling and not 0.0 < config.top_p <= 1.0:  # also refuses nan
        raise NmtError(f"top-p must be in (0, 1], got {config.top_p}")


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
                 choose: Callable[[Tensor], Tensor], sync_every: int) -> list[list[Hypothesis]]:
    """Extend `rows` independent hypotheses per sentence by one chosen token per step until EOS."""
    batch, device = max_len.numel(), max_len.device
    if rows > 1:
        expand = torch.arange(batch, device=device).repeat_interleave(rows)  # (B*rows,)
        state, max_len = model.reorder_state(state, expand), max_len[expand]
    total, limit = batch * rows, int(max_len.max())
    origin = torch.arange(total, device=device)  # (R,) output row of each live row
    tokens = torch.full((total, limit), PAD_ID, device=device)  # (R, T)
    raw = torch.zeros(total, device=device)  # (R,)
    last = torch.full((total,), BOS_ID, device=device)  # (R,)
    stopped = torch.zeros(total, dtype=torch.bool, device=device)  # (R,) ended: output stored, until the next read
    out_tokens, out_raw = tokens.clone(), raw.clone()
    out_len = torch.zeros(total, dtype=torch.long, device=device)
    shortest = int(max_len.min())  # no row is at its limit before this step: _mask need not look
    for step in range(limit):
        log_probs, state = model.step(last, state)  # (R, V)
        log_probs = _mask(log_probs, step, max_len if step + 1 >= shortest else None, config, sync_every > 1)
        last = choose(log_probs)  # (R,)
        raw = raw + log_probs.gather(1, last.unsqueeze(1)).squeeze(1)
        tokens[:, step] = last
        ended = (last == EOS_ID) & ~stopped  # (R,) forced at each row's limit
        if sync_every > 1 or ended.any():  # reading every step, skip the stores when nothing ended
            out_tokens[origin] = torch.where(ended.unsqueeze(1), tokens, out_tokens[origin])
            out_raw[origin] = torch.where(ended, raw, out_raw[origin])
            out_len[origin] = torch.where(ended, step + 1, out_len[origin])
            stopped |= ended
        if (step + 1) % sync_every == 0 and stopped.any():  # the host read: ended rows leave
            keep = (~stopped).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            state = model.reorder_state(state, keep)
            tokens, raw, max_len, origin, last = tokens[keep], raw[keep], max_len[keep], origin[keep], last[keep]
            stopped, shortest = stopped[keep], int(max_len.min())
    return _hypotheses(
        out_tokens.view(batch, rows, limit), out_raw.view(batch, rows), out_len.view(batch, rows), config
    )


def _hypotheses(tokens: Tensor, raw: Tensor, length: Tensor, config: DecodeConfig) -> list[list[Hypothesis]]:
    """Per sentence, its hypotheses best first; tokens (B, n, T), raw and length (B, n); length 0 = none."""
    lp = _penalty_table(tokens.size(2), config, tokens.device)
    score = (raw / lp[length]).masked_fill(length == 0, NEG_INF)  # (B, n)
    order = score.sort(dim=1, descending=True, stable=True).indices  # (B, n)
    tokens = tokens.gather(1, order.unsqueeze(2).expand_as(tokens)).tolist()
    score, raw, length = (values.gather(1, order).tolist() for values in (score, raw, length))
    return [
        [Hypothesis(toks[:n], s, r) for toks, s, r, n in zip(*sentence, strict=True) if n > 0]
        for sentence in zip(tokens, score, raw, length, strict=True)
    ]
