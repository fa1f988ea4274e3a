"""Padded tensors for one batch, and the one rule for what a model reads as its source.

Stored ids carry no BOS/EOS. A source sentence is its ids followed by EOS (no
BOS); the target is shifted: decoder input BOS + y, decoder output y + EOS.
`source_ids` is the definition of the source side, used by the translator;
`terminated` applies the same rule to whole padded arrays for training, and a
test holds the two equal, so training and translation cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

Example = tuple[Sequence[int], Sequence[int]]


def source_ids(ids: Sequence[int]) -> list[int]:
    """The model input for a source sentence's subword ids: the ids, then EOS."""
    return [*np.asarray(ids, dtype=np.int64).tolist(), EOS_ID]


def encode_source(tokenizer: Tokenizer, text: str) -> list[int]:
    """Normalise, encode and terminate a source sentence exactly as training saw it."""
    return source_ids(tokenizer.encode(text))


@dataclass
class Batch:
    """One training batch; every tensor is padded with PAD_ID at the end of each row."""

    src: torch.Tensor  # (B, S) long: source ids + EOS
    src_mask: torch.Tensor  # (B, S) bool: True at real tokens
    tgt_in: torch.Tensor  # (B, T) long: BOS + target ids
    tgt_out: torch.Tensor  # (B, T) long: target ids + EOS
    src_tokens: int  # real source positions (EOS included)
    tgt_tokens: int  # real target positions (EOS included): what the loss is averaged over

    @property
    def size(self) -> int:
        return self.src.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return replace(self, **{name: fn(getattr(self, name)) for name in _TENSORS})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def with_token_dropout(self, src_rate: float, tgt_rate: float) -> Batch:
        """A copy in which each source token and each decoder-input token (never EOS, BOS or padding) is
        replaced by <unk> with the given probability: word dropout (Sennrich et al. 2016, Gal & Ghahramani
        2016), a regulariser for small corpora. The targets the loss reads are kept. Drawn from torch's
        generator on the batch's device, which checkpoints save, so a seeded run and its resumption agree."""
        src = _unk_some(self.src, self.src_mask & (self.src != EOS_ID), src_rate)
        tgt_in = _unk_some(self.tgt_in, (self.tgt_in != PAD_ID) & (self.tgt_in != BOS_ID), tgt_rate)
        return replace(self, src=src, tgt_in=tgt_in)

    def pin_memory(self) -> Batch:
        """Page-locked copies, so `to(cuda, non_blocking=True)` overlaps with compute."""
        return self._map(lambda t: t.pin_memory())


_TENSORS = ("src", "src_mask", "tgt_in", "tgt_out")


def _unk_some(ids: torch.Tensor, eligible: torch.Tensor, rate: float) -> torch.Tensor:
    """`ids` with each `eligible` position replaced by UNK_ID with probability `rate`."""
    if rate <= 0:
        return ids
    drop = eligible & (torch.rand(ids.shape, device=ids.device) < rate)
    return ids.masked_fill(drop, UNK_ID)


def _pad(rows: Sequence[Sequence[int]], lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) int64 array of `rows`, right-padded with PAD_ID."""
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for row, (ids, n) in enumerate(zip(rows, lengths, strict=True)):
        out[row, :n] = ids
    return out


def pad_sources(sources: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad model-ready sources (from `source_ids`/`encode_source`): ids (B, S) and mask (B, S), True at real tokens."""
    lengths = np.array([len(s) for s in sources], dtype=np.int64)  # (B,)
    width = int(lengths.max())
    mask = np.arange(width)[None, :] < lengths[:, None]  # (B, S)
    return torch.from_numpy(_pad(sources, lengths, width)), torch.from_numpy(mask)


def collate(examples: Sequence[Example], pin_memory: bool = False) -> Batch:
    """Pad a list of (source ids, target ids) pairs, as stored (no BOS/EOS), into a `Batch`."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    src_lengths = np.array([len(s) for s, _ in examples], dtype=np.int64)  # (B,)
    tgt_lengths = np.array([len(t) for _, t in examples], dtype=np.int64)  # (B,)
    src = _pad([s for s, _ in examples], src_lengths, int(src_lengths.max()) + 1)
    tgt = _pad([t for _, t in examples], tgt_lengths, int(tgt_lengths.max()) + 1)
    return terminated(src, src_lengths, tgt, tgt_lengths, pin_memory)


def terminated(src: np.ndarray, src_lengths: np.ndarray, tgt: np.ndarray, tgt_lengths: np.ndarray,
               pin_memory: bool = False) -> Batch:
    """The `Batch` of stored ids padded one column wider than the longest row (room for EOS): EOS
    appended to both sides and BOS prepended to the target's input, in whole-array operations."""
    rows = np.arange(len(src))
    src[rows, src_lengths] = EOS_ID  # (B, S): x + EOS
    src_mask = np.arange(src.shape[1])[None, :] <= src_lengths[:, None]  # (B, S)
    tgt_in = np.empty_like(tgt)  # (B, T): BOS + y, then PAD
    tgt_in[:, 0] = BOS_ID
    tgt_in[:, 1:] = tgt[:, :-1]
    tgt[rows, tgt_lengths] = EOS_ID  # (B, T): y + EOS
    batch = Batch(
        src=torch.from_numpy(src),
        src_mask=torch.from_numpy(src_mask),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt),
        src_tokens=int(src_lengths.sum()) + len(src),
        tgt_tokens=int(tgt_lengths.sum()) + len(tgt),
    )
    return batch.pin_memory() if pin_memory else batch
