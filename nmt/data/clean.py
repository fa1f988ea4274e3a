"""Cleaning rules for training pairs, every dropped pair counted under one reason.

Rules run in this order, and a pair is counted under the first rule that drops it:
1. normalisation (Unicode NFC or NFKC, whitespace collapsed; the same
   `nmt.tokenizer.normalize` the tokenizer applies at translation time);
2. `empty`: a side is empty after normalisation;
3. `duplicate`: the same normalised pair was already kept (with dedup on);
4. `overlap`: the pair equals a valid or test pair (with dedup on), so the
   held-out sets stay unseen;
5. `too_long`: a side has more than `max_len` subword tokens, BOS/EOS excluded;
6. `ratio`: the longer side has more than `max_ratio` times the tokens of the shorter.
Rules 2-4 run on text, before encoding, so dropped pairs cost no tokenisation.
Valid and test pairs are normalised but never dropped: scores stay comparable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from nmt.errors import NmtError
from nmt.tokenizer import normalize

REASONS = ("empty", "duplicate", "overlap", "too_long", "ratio")

Pair = tuple[str, str]


@dataclass
class CleanConfig:
    """Cleaning settings; stored in meta.json, and `normalization` is reused at translation time."""

    normalization: str = "NFC"
    max_len: int = 250  # longest side in subword tokens, BOS/EOS excluded; 0 = no limit
    max_ratio: float = 3.0  # longer side / shorter side, in tokens; 0 = no limit
    dedup: bool = True  # drop repeated pairs and training pairs equal to a valid/test pair

    def __post_init__(self) -> None:
        normalize("", self.normalization)  # rejects an unknown form in one line
        if self.max_len < 0 or self.max_ratio < 0:
            raise NmtError("max_len and max_ratio must be >= 0 (0 disables the rule)")
        if 0 < self.max_ratio < 1:
            raise NmtError(f"max_ratio must be at least 1 (or 0 to disable), got {self.max_ratio}")

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "order": ["normalize", *REASONS]}


@dataclass
class Counts:
    """What happened to the pairs of one split."""

    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def to_dict(self) -> dict[str, int]:
        return {"read": self.read, **self.dropped, "kept": self.kept}


def pair_key(src: str, tgt: str) -> bytes:
    """64-bit digest of a normalised pair (which holds no tab): dedup memory stays small."""
    return hashlib.blake2b(f"{src}\t{tgt}".encode(), digest_size=8).digest()


def normalize_pairs(pairs: Iterable[Pair], form: str) -> list[Pair]:
    return [(normalize(s, form), normalize(t, form)) for s, t in pairs]


class Cleaner:
    """Applies the rules to the training split chunk by chunk, keeping the counts."""

    def __init__(self, config: CleanConfig, held_out: frozenset[bytes] = frozenset()) -> None:
        self.config = config
        self.counts = Counts()
        self._held_out = held_out
        self._seen: set[bytes] = set()

    def filter_text(self, pairs: Sequence[Pair]) -> list[Pair]:
        """Normalise raw pairs; return those with two non-empty sides, not seen before."""
        self.counts.read += len(pairs)
        kept = []
        for src, tgt in normalize_pairs(pairs, self.config.normalization):
            reason = self._text_reason(src, tgt)
            if reason:
                self.counts.dropped[reason] += 1
            else:
                kept.append((src, tgt))
        return kept

    def _text_reason(self, src: str, tgt: str) -> str:
        if not src or not tgt:
            return "empty"
        if not self.config.dedup:
            return ""
        key = pair_key(src, tgt)
        if key in self._seen:
            return "duplicate"
        if key in self._held_out:
            return "overlap"
        self._seen.add(key)
        return ""

    def filter_lengths(self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> list[bool]:
        """Which encoded pairs pass the length and ratio rules (True = keep)."""
        keep = []
        for s, t in zip(src, tgt, strict=True):
            reason = self._length_reason(len(s), len(t))
            if reason:
                self.counts.dropped[reason] += 1
            keep.append(not reason)
        self.counts.kept += sum(keep)
        return keep

    def _length_reason(self, src_len: int, tgt_len: int) -> str:
        longer, shorter = max(src_len, tgt_len), min(src_len, tgt_len)
        if self.config.max_len and longer > self.config.max_len:
            return "too_long"
        if self.config.max_ratio and longer > self.config.max_ratio * max(shorter, 1):
            return "ratio"
        return ""
