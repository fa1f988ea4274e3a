"""Automatic sizing: the table's choices, explicit values winning, and the trainer applying them."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmt.config import Config, explicit_options
from nmt.errors import NmtError
from nmt.train import Trainer
from nmt.train.sizing import SIZED_OPTIONS, choose_schedule_and_regularisation, choose_shape
from tests.test_train import make_config

FREE = frozenset(SIZED_OPTIONS)


def never_timed() -> float:
    raise AssertionError("an update budget needs no timing")


@pytest.mark.parametrize(("pairs", "d_model", "ffn_dim", "max_tokens", "lr"), [
    (3_000, 256, 512, 1024, 1.4e-3), (11_999, 256, 512, 1024, 1.4e-3), (12_000, 256, 1024, 1024, 1.4e-3),
    (59_999, 256, 1024, 1024, 1.4e-3), (60_000, 384, 1536, 2048, 1e-3), (80_000, 384, 1536, 2048, 1e-3),
    (150_000, 384, 1536, 4096, 1e-3), (2_000_000, 512, 2048, 4096, 1e-3),
])
def test_shape_follows_the_corpus_size(pairs: int, d_model: int, ffn_dim: int, max_tokens: int, lr: float) -> None:
    config = Config()
    choices = choose_shape(config, pairs, FREE)
    assert (config.model.d_model, config.model.ffn_dim, config.train.max_tokens) == (d_model, ffn_dim, max_tokens)
    assert config.train.lr == lr
    assert config.model.d_model % config.model.heads == 0
    assert all(f"{pairs:,} training pairs" in c.reason for c in choices if c.option.startswith("model."))


@pytest.mark.parametrize(("updates", "dropout", "smoothing", "token_dropout", "warmup", "valid_every"), [
    (100, 0.1, 0.1, 0.0, 50, 100),  # 10 epochs: little regularisation; warm-up half the run, validation at its floor
    (300, 0.1, 0.1, 0.0, 100, 100),  # 3 epochs: warm-up and validation at their floors
    (2_000, 0.2, 0.1, 0.05, 160, 250),  # 20 epochs
    (30_000, 0.3, 0.2, 0.1, 2400, 2000),  # 300 epochs; validation at its ceiling
])
def test_regularisation_follows_the_epochs_the_budget_allows(updates: int, dropout: float, smoothing: float,
                                                              token_dropout: float, warmup: int,
                                                              valid_every: int) -> None:
    config = Config()
    config.train.max_updates = updates
    choose_schedule_and_regularisation(config, 1_000, FREE, updates_per_epoch=100 if updates != 100 else 10,
                                       seconds_per_update=never_timed)
    assert config.model.dropout == dropout and config.train.label_smoothing == smoothing
    assert config.train.src_token_dropout == config.train.tgt_token_dropout == token_dropout
    assert (config.train.warmup, config.train.valid_every) == (warmup, valid_every)


def test_a_time_budget_is_converted_to_updates_by_timing_one() -> None:
    config = Config()
    config.train.max_minutes = 10.0
    choices = choose_schedule_and_regularisation(config, 1_000, FREE, updates_per_epoch=50,
                                                 seconds_per_update=lambda: 0.5)
    # 600 s / (0.5 s x 1.15 for validation) = 1,043 updates = 21 epochs of 50 updates
    assert config.train.warmup == 83 + 17 and config.model.dropout == 0.2
    assert "10 minutes at 0.57 s per update, measured" in choices[0].reason


def test_unbounded_runs_and_explicit_values_are_left_alone() -> None:
    config = Config()
    assert choose_schedule_and_regularisation(config, 1_000, FREE, 100, never_timed) == []
    assert config == Config()
    config.train.max_updates = 30_000
    free = FREE - {"model.dropout", "train.warmup"}
    options = {c.option for c in choose_schedule_and_regularisation(config, 1_000, free, 100, never_timed)}
    assert "model.dropout" not in options and config.model.dropout == Config().model.dropout
    assert config.train.warmup == Config().train.warmup and config.train.label_smoothing == 0.2


def test_explicit_options_are_the_family_the_file_and_the_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[model]\nd_model = 128\n[train]\nlr = 0.001\n")
    found = explicit_options(tmp_path / "c.toml", "lstm", ["model.dropout=0.2", "train.max_minutes=5"])
    assert {"model.d_model", "train.lr", "model.dropout", "train.max_minutes", "model.cell"} <= found
    assert "model.ffn_dim" not in found and explicit_options() == set()


def test_the_trainer_sizes_a_transformer_and_keeps_explicit_values(toy_data: Path, tmp_path: Path) -> None:
    config = make_config(toy_data, tmp_path / "run", "train.max_updates=3")
    trainer = Trainer(config, choose=FREE - {"model.d_model", "model.heads", "train.max_tokens"})
    chosen = {choice.option: choice.value for choice in trainer.choices}
    assert trainer.config.model.d_model == 32 and "model.d_model" not in chosen  # explicit wins
    assert trainer.config.model.ffn_dim == chosen["model.ffn_dim"] == 512  # a toy corpus: the smallest shape
    assert trainer.config.train.warmup == 1 and trainer.step.schedule.name == "wsd"  # half of 3 updates
    assert trainer.model.decoder[0].res_ffn.dropout.p == chosen["model.dropout"]  # the model is built with it
    assert Trainer(make_config(toy_data, tmp_path / "plain", "train.max_updates=3")).choices == []


def test_an_explicit_budgeted_schedule_waits_for_the_sized_warmup(toy_data: Path, tmp_path: Path) -> None:
    """`--set train.scheduler=wsd --set train.max_updates=300` is checked against the warm-up sizing chooses (100),
    not the default one (4,000) it replaces; a warm-up that nothing sizes (the LSTM) is still checked."""
    config = make_config(toy_data, tmp_path / "run", "train.scheduler=wsd", "train.max_updates=300")
    config.train.warmup = 4000  # the library default, which sizing replaces
    trainer = Trainer(config, choose=FREE)
    assert trainer.config.train.warmup == 100 and trainer.step.schedule.name == "wsd"
    lstm = make_config(toy_data, tmp_path / "lstm", "train.scheduler=wsd", "train.max_updates=300", "model.arch=rnn")
    lstm.train.warmup = 4000
    with pytest.raises(NmtError, match="needs train.max_updates .* above train.warmup"):
        Trainer(lstm, choose=FREE)
