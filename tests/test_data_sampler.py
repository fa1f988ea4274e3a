"""The token batch sampler's invariants, and what `collate` hands the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nmt.data import (
    EncodedSplit,
    PreparedData,
    TokenBatchSampler,
    collate,
    encode_source,
    pad_sources,
    padding_fraction,
    source_ids,
)
from nmt.errors import NmtError
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


def lengths(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(1, 60, size=n)
    tgt = np.clip(src + rng.integers(-5, 6, size=n), 1, None)
    return src, tgt


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_every_example_once_and_no_batch_over_the_limit() -> None:
    src, tgt = lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=400, seed=3)
    for epoch in (1, 2):
        batches = sampler.batches(epoch)
        assert sorted(flat(batches)) == list(range(len(src)))
        for batch in batches:
            assert len(batch) * (max(src[batch].max(), tgt[batch].max()) + 1) <= 400


def test_collated_tensors_stay_within_max_tokens() -> None:
    src, tgt = lengths(200)
    split = EncodedSplit.from_lists([[5] * n for n in src], [[6] * n for n in tgt])
    for batch_ids in TokenBatchSampler(split.src_lengths, split.tgt_lengths, max_tokens=300, seed=1).batches(1):
        batch = collate([split[i] for i in batch_ids])
        assert batch.src.numel() <= 300 and batch.tgt_in.numel() <= 300


def test_an_example_longer_than_the_budget_gets_a_batch_of_its_own() -> None:
    sampler = TokenBatchSampler(np.array([3, 50, 4, 2]), np.array([3, 70, 5, 2]), max_tokens=20, seed=0)
    batches = sampler.batches(1)
    assert [1] in batches
    assert sorted(flat(batches)) == [0, 1, 2, 3]


def test_deterministic_for_seed_and_epoch_and_different_across_epochs() -> None:
    src, tgt = lengths()
    first = TokenBatchSampler(src, tgt, 500, seed=7).batches(3)
    again = TokenBatchSampler(src, tgt, 500, seed=7).batches(3)
    assert first == again
    assert TokenBatchSampler(src, tgt, 500, seed=7).batches(4) != first
    assert TokenBatchSampler(src, tgt, 500, seed=8).batches(3) != first


def test_batches_group_similar_lengths() -> None:
    src, tgt = lengths(2000)
    sampler = TokenBatchSampler(src, tgt, 2000, seed=0)
    assert padding_fraction(sampler.batches(1), src, tgt) < 0.1
    unsorted = np.array_split(np.random.default_rng(0).permutation(len(src)), len(sampler.batches(1)))
    assert padding_fraction([list(b) for b in unsorted], src, tgt) > 0.3


def test_padding_fraction_counts_eos_and_bos_as_real() -> None:
    # one batch, sources 1 and 3 tokens (+EOS: 2, 4), targets 2 and 2 (+1: 3, 3)
    assert padding_fraction([[0, 1]], np.array([1, 3]), np.array([2, 2])) == pytest.approx(1 - 12 / 14)


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_ranks_are_disjoint_covering_and_equally_long(world_size: int) -> None:
    src, tgt = lengths(301)
    shards = [TokenBatchSampler(src, tgt, 600, seed=2, rank=r, world_size=world_size).batches(1)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    everything = [i for shard in shards for i in flat(shard)]
    assert sorted(everything) == list(range(len(src)))


def test_too_few_examples_for_the_ranks_is_an_error() -> None:
    with pytest.raises(NmtError, match="same number of batches"):
        TokenBatchSampler(np.array([9, 9]), np.array([9, 9]), 10, rank=0, world_size=3).batches(1)
    with pytest.raises(NmtError, match="rank 3"):
        TokenBatchSampler(np.array([1]), np.array([1]), 10, rank=3, world_size=2)


def test_unshuffled_batches_run_from_short_to_long() -> None:
    src, tgt = lengths(100)
    batches = TokenBatchSampler(src, tgt, 300, shuffle=False).batches(1)
    assert batches == TokenBatchSampler(src, tgt, 300, shuffle=False).batches(9)
    longest = [int(np.maximum(src, tgt)[b].max()) for b in batches]
    assert longest == sorted(longest)


def test_collate_shifts_the_target_and_terminates_the_source() -> None:
    batch = collate([(np.array([7, 8, 9], dtype=np.uint16), np.array([4], dtype=np.uint16)), ([5], [6, 7, 8])])
    assert batch.src.tolist() == [[7, 8, 9, EOS_ID], [5, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.src_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 4, PAD_ID, PAD_ID], [BOS_ID, 6, 7, 8]]
    assert batch.tgt_out.tolist() == [[4, EOS_ID, PAD_ID, PAD_ID], [6, 7, 8, EOS_ID]]
    assert batch.src.dtype == torch.long and batch.src_mask.dtype == torch.bool
    assert (batch.src_tokens, batch.tgt_tokens, batch.size) == (6, 6, 2)
    assert batch.to("cpu").tgt_out.equal(batch.tgt_out)


def test_a_split_collates_its_batches_vectorised_exactly_as_collate(toy_data: Path) -> None:
    """The trainer's vectorised path (one gather over the memory-mapped ids) against the per-example one."""
    split = PreparedData.open(toy_data).split("train")
    rng = np.random.default_rng(0)
    for indices in ([0], [len(split) - 1, 0, 5], [-1, 3], rng.choice(len(split), 64, replace=False).tolist()):
        vectorised, looped = split.batch(indices), collate([split[i] for i in indices])
        for name in ("src", "src_mask", "tgt_in", "tgt_out"):
            assert torch.equal(getattr(vectorised, name), getattr(looped, name)), name
            assert getattr(vectorised, name).dtype == getattr(looped, name).dtype
        assert (vectorised.src_tokens, vectorised.tgt_tokens) == (looped.src_tokens, looped.tgt_tokens)
    assert torch.equal(split.batch([2, 1]).tgt_out, collate([split[2], split[1]]).tgt_out)  # order kept
    with pytest.raises(IndexError, match="out of range for a split of"):
        split.batch([len(split)])
    with pytest.raises(ValueError, match="empty batch"):
        split.batch([])


def test_translation_encodes_sources_as_training_does(joint_spm) -> None:  # type: ignore[no-untyped-def]
    tok = Tokenizer.load(joint_spm)
    ids = encode_source(tok, "a  dog runs ")
    assert ids == source_ids(tok.encode("a dog runs")) and ids[-1] == EOS_ID
    src, mask = pad_sources([ids])
    assert src[0].tolist() == collate([(tok.encode("a dog runs"), [5])]).src[0].tolist()
    assert mask.all()
