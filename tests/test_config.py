from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nmt.config import Config, defaults_for, from_dict, load_config, merge, parse_overrides, to_dict, to_toml
from nmt.errors import NmtError


def test_overrides_are_typed_and_merged_in_order() -> None:
    config = Config()
    merge(config, defaults_for("gru"))
    merge(config, parse_overrides(["train.lr=0.002", "model.norm=post", "train.adam_betas=[0.9, 0.99]", "train.data=a/b", "train.max_minutes=5"]))
    assert (config.model.arch, config.model.cell, config.train.scheduler) == ("rnn", "gru", "plateau")
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
