"""UpdateStep: the batches collated in the background are the ones trained on, and give the same update."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nmt.train import Trainer
from tests.test_train import make_config


def test_prefetched_batches_give_the_same_updates(toy_data: Path, tmp_path: Path, train_device: list[str]) -> None:
    """Exact on every device: both trainers run the same kernels on the same device (on a GPU, the
    prefetched batches are pinned and copied without waiting)."""
    extra = ["train.max_tokens=300", "train.accum_steps=2", "model.dropout=0.0", "train.valid_bleu=false",
             "train.best_metric=loss", *train_device]
    plain, prefetching = (Trainer(make_config(toy_data, tmp_path / name, *extra)) for name in ("a", "b"))
    batches = plain.sampler.batches(1)
    groups = [batches[i:i + 2] for i in range(0, 8, 2)]
    for index, group in enumerate(groups[:3]):
        expected = plain.update(group)
        plain.progress.update += 1
        got = prefetching.update(group, groups[index + 1])  # the next group is collated meanwhile
        prefetching.progress.update += 1
        assert got == expected
    assert prefetching.step._prefetched is not None and prefetching.step._prefetched[0] == groups[3]
    for (name, a), b in zip(plain.model.state_dict().items(), prefetching.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert prefetching.step._collated(groups[0]) is not None and prefetching.step._prefetched is None  # a miss


def test_deterministic_training_asks_torch_for_deterministic_kernels(toy_data: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        Trainer(make_config(toy_data, tmp_path / "d", "train.deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(previous)


def test_compiled_training_matches_eager_and_compiles_a_few_times_not_per_batch(toy_data: Path,
                                                                                tmp_path: Path) -> None:
    """train.compile: the same losses as eager within float rounding (compiled kernels fuse and reorder
    sums), on batches of many widths, while dynamo compiles a bounded number of graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    extra = ["train.max_tokens=300", "model.dropout=0.0", "train.valid_bleu=false", "train.best_metric=loss",
             "train.device=cpu"]
    eager, compiled = (Trainer(make_config(toy_data, tmp_path / name, *extra, f"train.compile={flag}"))
                       for name, flag in (("eager", "false"), ("compiled", "true")))
    batches = eager.sampler.batches(1)[:8]
    assert len({batch.src.shape for batch in eager.step._collate(batches)}) > 4  # many shapes...
    assert len({batch.src.shape[1] % 8 for batch in compiled.step._collate(batches)}) == 1  # ...rounded widths
    for batch in batches:
        expected, got = eager.update([batch]), compiled.update([batch])
        assert got[2] == expected[2]  # target tokens: the rounding only adds padding
        assert got[0] == pytest.approx(expected[0], rel=1e-4), (got, expected)
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()


def test_token_dropout_replaces_only_real_tokens_and_keeps_the_targets() -> None:
    from nmt.data.batch import collate
    from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

    batch = collate([([5, 6, 7, 8], [9, 10]), ([11], [12, 13, 14])])
    unchanged = batch.with_token_dropout(0.0, 0.0)
    assert torch.equal(unchanged.src, batch.src) and torch.equal(unchanged.tgt_in, batch.tgt_in)
    everything = batch.with_token_dropout(1.0, 1.0)
    assert everything.src.tolist() == [[UNK_ID] * 4 + [EOS_ID], [UNK_ID, EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert everything.tgt_in.tolist() == [[BOS_ID, UNK_ID, UNK_ID, PAD_ID], [BOS_ID, UNK_ID, UNK_ID, UNK_ID]]
    assert torch.equal(everything.tgt_out, batch.tgt_out) and torch.equal(everything.src_mask, batch.src_mask)


def test_token_dropout_is_seeded() -> None:
    from nmt.data.batch import collate

    batch = collate([(list(range(4, 60)), list(range(4, 60)))] * 4)
    torch.manual_seed(3)
    first = batch.with_token_dropout(0.3, 0.1)
    torch.manual_seed(3)
    second = batch.with_token_dropout(0.3, 0.1)
    assert torch.equal(first.src, second.src) and torch.equal(first.tgt_in, second.tgt_in)
    dropped = (first.src != batch.src).float().mean().item()
    assert 0.1 < dropped < 0.5  # about 30% of 4 x 56 source tokens
