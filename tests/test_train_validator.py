"""Validator: loss on the whole set, BLEU on a capped part with a tighter length limit, progress as it decodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmt.config import DecodeConfig
from nmt.data import PreparedData
from nmt.models import build_model
from nmt.train.trainer import fill_vocabulary
from nmt.train.validator import Validator, length_chunks, validation_search
from tests.test_train import make_config


class Recorder:
    """A Reporter that remembers its tasks and how far each advanced."""

    def __init__(self) -> None:
        self.tasks: list[list] = []

    def task(self, description: str, total: float | None = None, unit: str = "lines"):
        entry = [description, total, unit, 0]
        self.tasks.append(entry)

        def advance(amount: float) -> None:
            entry[3] += amount

        return advance


@pytest.fixture(scope="module")
def model_and_data(toy_data: Path) -> tuple[torch.nn.Module, PreparedData]:
    """An untrained tiny Transformer: what it outputs is arbitrary, how much is decoded is not."""
    data = PreparedData.open(toy_data)
    config = make_config(toy_data, Path("unused"))
    fill_vocabulary(config.model, data)
    torch.manual_seed(0)
    return build_model(config.model), data


def make_validator(data: PreparedData, max_sentences: int, bleu: bool = True) -> Validator:
    return Validator(data.split("valid"), data.tgt_tokenizer, DecodeConfig(), batch_tokens=600,
                     max_sentences=max_sentences, bleu=bleu, label_smoothing=0.1, device=torch.device("cpu"),
                     amp_dtype=None)


def test_validation_search_is_greedy_with_a_tighter_length_limit() -> None:
    search = validation_search(DecodeConfig(beam=5, nbest=3, sampling=True, alpha=1.0))
    assert (search.beam, search.nbest, search.sampling, search.max_len_a, search.max_len_b) == (1, 1, False, 1.2, 10)
    assert search.alpha == 1.0
    tighter = validation_search(DecodeConfig(max_len_a=1.0, max_len_b=3))
    assert (tighter.max_len_a, tighter.max_len_b) == (1.0, 3)


def test_bleu_is_capped_and_reports_progress_the_loss_is_not(model_and_data) -> None:
    model, data = model_and_data
    reporter = Recorder()
    capped = make_validator(data, max_sentences=4)(model, update=3, epoch=1, reporter=reporter)
    assert reporter.tasks == [["validation BLEU", 4, "sentences", 4]]
    assert capped["bleu_sentences"] == 4 and {"kind": "valid", "update": 3, "epoch": 1}.items() <= capped.items()
    whole = make_validator(data, max_sentences=0)(model, update=3, epoch=1)
    assert whole["bleu_sentences"] == len(data.split("valid")) == 40
    assert (capped["loss"], capped["ppl"]) == (whole["loss"], whole["ppl"])
    assert make_validator(data, max_sentences=1000)(model, 3, 1)["bleu_sentences"] == 40
    loss_only = make_validator(data, max_sentences=4, bleu=False)(model, 3, 1, reporter)
    assert set(loss_only) == {"kind", "update", "epoch", "loss", "ppl"} and len(reporter.tasks) == 1


def test_progress_steps_do_not_change_the_translations(model_and_data, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = model_and_data
    validator = make_validator(data, max_sentences=0)
    model.eval()
    with torch.inference_mode():
        monkeypatch.setattr("nmt.train.validator.BATCHES_PER_STEP", 1000)
        one_step, reporter = validator._decode(model, Recorder()), Recorder()
        monkeypatch.setattr("nmt.train.validator.BATCHES_PER_STEP", 0.1)
        many_steps = validator._decode(model, reporter)
    assert many_steps == one_step
    assert reporter.tasks[0][3] == 40


def test_chunks_are_longest_first_within_the_token_budget() -> None:
    sources = [[0] * n for n in (3, 1, 4, 1, 5)]
    assert length_chunks(sources, tokens=6) == [[4], [2], [0, 1, 3]]
    assert length_chunks(sources, tokens=2) == [[4], [2], [0], [1, 3]]  # a sentence over budget is a chunk alone
    assert length_chunks([], tokens=6) == []


class OneOfTwoRanks:
    """Rank `rank` of two, the other rank's contributions replayed from `other` (what all-reduce and
    all-gather would bring); records its own contributions for the other rank."""

    world_size = 2

    def __init__(self, rank: int, other: dict | None = None) -> None:
        self.rank, self.other, self.sent = rank, other or {}, {}

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sent["sums"] = tensor.clone()
        return tensor + self.other["sums"] if self.other else tensor

    def gather_object(self, value: dict) -> list[dict]:
        self.sent["translated"] = value
        if self.other:
            return [value, self.other["translated"]]
        return [dict.fromkeys(range(100), ""), value]  # a first pass, only to record this rank's share


def test_ranks_split_validation_and_gather_the_single_process_result(model_and_data) -> None:
    """Under DDP each rank validates its share; summed and gathered, the record is the one process's."""
    model, data = model_and_data
    alone = make_validator(data, max_sentences=7)(model, 3, 1)
    second = OneOfTwoRanks(1)
    validator = Validator(data.split("valid"), data.tgt_tokenizer, DecodeConfig(), batch_tokens=600, max_sentences=7,
                          bleu=True, label_smoothing=0.1, device=torch.device("cpu"), amp_dtype=None, dist=second)
    validator(model, 3, 1)
    assert len(second.sent["translated"]) == 3  # sentences 1, 3, 5 of 0..6
    first = OneOfTwoRanks(0, other=second.sent)
    validator.dist = first
    shared = validator(model, 3, 1)
    assert shared["bleu"] == alone["bleu"] and shared["example"] == alone["example"]
    assert shared["loss"] == pytest.approx(alone["loss"], rel=1e-12) and shared["ppl"] == pytest.approx(alone["ppl"])
