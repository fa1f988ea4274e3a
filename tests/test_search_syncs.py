"""Search that reads the device every few steps (as on a GPU) gives what reading every step gives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from nmt import search as search_module
from nmt.config import DecodeConfig
from nmt.search import beam_search, greedy_search, sync_interval
from nmt.tokenizer import EOS_ID, PAD_ID
from tests.test_search import ToyModel, batch_of, random_sentences

CONFIGS = [
    DecodeConfig(beam=1, nbest=1, max_len_a=1.0, max_len_b=3),
    DecodeConfig(beam=1, nbest=1, max_len_a=1.0, max_len_b=4, min_len=3, ban_unk=True),
    DecodeConfig(beam=4, nbest=1, max_len_a=1.0, max_len_b=3, alpha=1.0),
    DecodeConfig(beam=4, nbest=3, max_len_a=1.5, max_len_b=2, length_penalty="average"),
    DecodeConfig(beam=5, nbest=5, max_len_a=1.0, max_len_b=5, alpha=0.0),
    DecodeConfig(beam=3, nbest=2, max_len_a=1.0, max_len_b=3, early_stop=True),
]


class CountingModel(ToyModel):
    """Records the step of every reorder where sentences leave."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.leaving_steps: list[int] = []

    def reorder_state(self, state: dict[str, Tensor], rows: Tensor,
                      sentences: Tensor | None = None) -> dict[str, Tensor]:
        if sentences is not None:
            self.leaving_steps.append(self.steps)
        return super().reorder_state(state, rows, sentences)


def run(config: DecodeConfig, sync_every: int, device: str) -> tuple[list[Any], list[int]]:
    model = CountingModel(vocab=12, seed=21, scale=1.0, bias={EOS_ID: -0.5}, device=device)
    sentences = random_sentences(10, 12, seed=22, longest=9)
    model.finish_immediately(sentences[3])
    src, mask = batch_of(sentences, extra_pad=2, device=device)
    found = (greedy_search if config.beam == 1 else beam_search)(model, src, mask, config, sync_every=sync_every)
    return found, model.leaving_steps


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"beam{c.beam}-nbest{c.nbest}-early{c.early_stop}")
def test_reading_every_few_steps_changes_nothing_but_when_sentences_leave(config: DecodeConfig, device: str) -> None:
    every_step, leaving = run(config, 1, device)
    assert len(leaving) > 1  # sentences do leave at several steps
    for interval in (2, 3, 8):
        deferred, leaving = run(config, interval, device)
        assert deferred == every_step, interval  # exact: the same rows are computed, only kept longer
        assert all(step % interval == 0 for step in leaving), (interval, leaving)


def test_the_interval_is_one_on_a_cpu_and_longer_elsewhere() -> None:
    assert sync_interval(torch.device("cpu")) == 1
    assert sync_interval(torch.device("cuda", 0)) > 1


@pytest.mark.parametrize("interval", [1, 3, 8])
def test_beam_search_holds_only_the_rows_that_ended(interval: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory grows with the finished hypotheses, not with steps x beams x length: a step's extensions wait
    whole only until the next host read, which keeps just the rows that ended (each up to its EOS)."""
    collectors, waiting = [], []

    class Recording(search_module._Finished):
        def __init__(self) -> None:
            super().__init__()
            collectors.append(self)

        def compact(self) -> None:
            waiting.append(len(self.pending))
            super().compact()

    monkeypatch.setattr(search_module, "_Finished", Recording)
    config = DecodeConfig(beam=4, nbest=2, max_len_a=1.0, max_len_b=5)
    found, _ = run(config, interval, "cpu")
    (finished,) = collectors
    assert max(waiting) <= interval and not finished.pending
    tokens, raw = torch.cat(finished.tokens), torch.cat(finished.raw)
    assert raw.isfinite().all()
    ends = (tokens == EOS_ID).int()
    assert (ends.sum(1) == 1).all()  # one EOS per kept row, nothing but padding after it
    after_eos = ends.cumsum(1) - ends
    assert (tokens[after_eos.bool()] == PAD_ID).all()
    assert [len(hyps) for hyps in found] == [config.nbest] * 10
