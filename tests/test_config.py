from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nmt.config import (
    Config,
    defaults_for,
    from_dict,
    load_config,
    merge,
    parse_overrides,
    resolve,
    to_dict,
    to_toml,
    validate,
)
from nmt.errors import NmtError

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "multi30k"


def test_overrides_are_typed_and_merged_in_order() -> None:
    config = Config()
    merge(config, defaults_for("gru"))
    merge(config, parse_overrides(["train.lr=0.002", "model.norm=post", "train.adam_betas=[0.9, 0.99]",
                                   "train.data=a/b", "train.max_minutes=5"]))
    assert (config.model.arch, config.model.cell, config.train.warmup) == ("rnn", "gru", 0)
    assert config.train.lr == 0.002 and config.model.norm == "post"
    assert config.train.adam_betas == (0.9, 0.99)
    assert config.train.data == "a/b"
    assert config.train.max_minutes == 5.0 and isinstance(config.train.max_minutes, float)


def test_toml_round_trip(tmp_path: Path) -> None:
    config = Config()
    merge(config, parse_overrides(['train.run_dir="x \\"quoted\\" dir"', "model.dropout=0.25"]))
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert from_dict(load_config(path)) == config
    assert from_dict(tomllib.loads(to_toml(config))) == config
    assert from_dict(to_dict(config)) == config


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["train.lr"], "section.key=value"),
        (["lr=3"], "section.key=value"),
        (["nosuch.lr=3"], "unknown config section"),
        (["train.nosuch=3"], "unknown option train.nosuch"),
        (["train.max_updates=1.5"], "expects int"),
        (["train.valid_bleu=yes"], "expects bool"),
        (["model.dropout=high"], "expects float"),
    ],
)
def test_bad_overrides(items: list[str], message: str) -> None:
    with pytest.raises(NmtError, match=message):
        merge(Config(), parse_overrides(items))


def test_bad_files_and_models(tmp_path: Path) -> None:
    with pytest.raises(NmtError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[train\nlr=")
    with pytest.raises(NmtError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(NmtError, match="unknown model"):
        defaults_for("cnn")


def train_config(*items: str) -> Config:
    return merge(Config(), parse_overrides(["train.data=d", *items]))


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["train.data="], r"^no training data: set train.data \(nmt train --data DIR\)"),
        (["train.max_updates=-1"], r"^train.max_updates must be at least 0, got -1$"),
        (["train.max_minutes=-1"], r"^train.max_minutes must be at least 0, got -1.0$"),
        (["train.max_minutes=nan"], r"^train.max_minutes must be at least 0, got nan$"),
        (["train.max_epochs=-2"], r"^train.max_epochs must be at least 0"),
        (["train.valid_max_sentences=-1"], r"^train.valid_max_sentences must be at least 0"),
        (["train.keep_last=0"], r"^train.keep_last must be at least 1, got 0$"),
        (["train.accum_steps=0"], r"^train.accum_steps must be at least 1"),
        (["train.lr=0"], r"^train.lr must be a positive number, got 0.0$"),
        (["train.label_smoothing=1"], r"^train.label_smoothing must be in \[0, 1\)"),
        (["train.plateau_factor=0"], r"^train.plateau_factor must be in \(0, 1\]"),
        (["train.optimizer=sgd"], r"^unknown train.optimizer 'sgd'; choose one of adam, adamw$"),
        (["train.scheduler=exponential"], r"^unknown train.scheduler 'exponential'; choose one of auto, linear"),
        (["train.best_metric=ter"], r"^unknown train.best_metric 'ter'; choose one of bleu, chrf, loss, ppl$"),
        (["train.precision=fp8"], r"^unknown train.precision 'fp8'; choose one of auto, fp32, bf16, fp16$"),
        (["train.valid_bleu=false"], r"^best_metric bleu needs train.valid_bleu = true$"),
        (["train.scheduler=noam", "train.warmup=0"], r"^scheduler noam needs train.warmup > 0$"),
        (["train.scheduler=cosine", "train.warmup=100"], r"^scheduler cosine decays to the end of the run's budget"),
        (["train.scheduler=wsd", "train.max_updates=100"], r"^scheduler wsd needs train.max_updates .* train.warmup$"),
        (["train.decay_fraction=0"], r"^train.decay_fraction must be in \(0, 1\], got 0.0$"),
        (["train.adam_betas=[2.0, -1.0]"], r"^train.adam_betas must each be in \[0, 1\), got \[2.0, -1.0\]$"),
        (["train.adam_eps=-1"], r"^train.adam_eps must be a positive number, got -1.0$"),
        (["train.weight_decay=inf"], r"^train.weight_decay must be a finite number, got inf$"),
        (["model.heads=0"], r"^model.heads must be at least 1, got 0$"),  # once a ZeroDivisionError traceback
        (["model.d_model=-8"], r"^model.d_model must be at least 1, got -8$"),
        (["model.ffn_dim=-1"], r"^model.ffn_dim must be at least 1, got -1$"),
        (["model.ffn_dim=0"], r"^model.ffn_dim must be at least 1, got 0$"),  # once trained silently
        (["model.hidden_size=0"], r"^model.hidden_size must be at least 1, got 0$"),
        (["model.enc_layers=0"], r"^model.enc_layers must be at least 1, got 0$"),
        (["model.max_positions=1"], r"^model.max_positions must be at least 2, got 1$"),
        (["model.d_model=30"], r"^model.d_model 30 is not divisible by model.heads 4$"),
        (["model.dropout=-0.1"], r"^model.dropout must be in \[0, 1\), got -0.1$"),
        (["model.dropout=1.5"], r"^model.dropout must be in \[0, 1\), got 1.5$"),
        (["model.dropout=nan"], r"^model.dropout must be in \[0, 1\), got nan$"),
        (["model.attention_dropout=-1"], r"^model.attention_dropout must be in \[0, 1\), got -1.0$"),
        (["model.activation_dropout=1"], r"^model.activation_dropout must be in \[0, 1\), got 1.0$"),
        # [decode] is stored in every checkpoint: refused before training, not when translating an hour later
        (["decode.beam=0"], r"^\[decode\] beam size must be at least 1, got 0$"),
        (['decode.length_penalty="bogus"'], r"^\[decode\] unknown length penalty 'bogus'; choose one of gnmt"),
        (["decode.nbest=6"], r"^\[decode\] nbest 6 is larger than the beam size 5$"),
        (["decode.alpha=1e308"], r"^\[decode\] alpha \(the length penalty exponent\) must be in \[0, 10\]"),
    ],
)
def test_validate_rejects_bad_training_options(items: list[str], message: str) -> None:
    with pytest.raises(NmtError, match=message):
        validate(train_config(*items))


def test_validate_accepts_the_defaults_and_the_recipes() -> None:
    validate(train_config())
    for recipe in sorted(RECIPES.glob("*.toml")):
        validate(resolve(recipe, overrides=["train.data=d"]))


def test_resolve_precedence(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[train]\nlr = 0.005\nwarmup = 7\n[model]\ndropout = 0.4\n")
    config = resolve(tmp_path / "c.toml", model="gru", overrides=["train.warmup=9"])
    assert (config.model.arch, config.model.cell, config.model.enc_layers) == ("rnn", "gru", 2)  # family
    assert (config.train.lr, config.model.dropout) == (0.005, 0.4)  # the file over the family
    assert config.train.warmup == 9  # overrides over the file
    assert resolve() == Config()


def test_resolve_for_resuming(tmp_path: Path) -> None:
    with pytest.raises(NmtError, match=r"^a resumed run continues with its stored config: drop --config/--model"):
        resolve(model="lstm", resume=True)
    with pytest.raises(NmtError, match=f"^{tmp_path / 'run'}: no checkpoint to resume from$"):
        resolve(overrides=[f'train.run_dir="{tmp_path / "run"}"'], resume=True)
