"""What a decoding may do: its options, each sentence's output limit and the length penalty.

Every search strategy and engine shares these, so that their results compare exactly (see nmt.search).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nmt.config import MAX_ALPHA, DecodeConfig
from nmt.errors import NmtError

PENALTIES = ("gnmt", "average")
PENALTY_MAX = torch.finfo(torch.float32).max  # the penalty table is float32
MAX_OUTPUT = 1 << 20  # tokens: an output limit above this is an overflow of a * src_len + b, not a length


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
