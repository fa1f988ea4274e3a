from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nmt.checkpoint import Checkpoint, average_checkpoints, load_checkpoint
from nmt.config import Config
from nmt.errors import NmtError
from nmt.tokenizer import Tokenizer


def make_checkpoint(tokenizer: Tokenizer, value: float, train_state: dict | None = None) -> Checkpoint:
    state = {"w": torch.full((2, 3), value), "steps": torch.tensor(7)}
    return Checkpoint(Config(), state, tokenizer, tokenizer, train_state)


def test_round_trip_and_weights_only(joint_spm: Path, tmp_path: Path) -> None:
    tok = Tokenizer.load(joint_spm, "NFKC")
    ckpt = make_checkpoint(tok, 1.5, {"progress": {"update": 3}, "rng": [{"torch": torch.get_rng_state()}]})
    ckpt.config.model.d_model = 64
    path = tmp_path / "c.pt"
    ckpt.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)  # loadable without arbitrary code
    assert raw["format"] == "nmt-checkpoint"
    loaded = load_checkpoint(path)
    assert loaded.config.model.d_model == 64
    assert torch.equal(loaded.model_state["w"], ckpt.model_state["w"])
    assert loaded.src_tokenizer == tok and loaded.tgt_tokenizer is loaded.src_tokenizer
    assert loaded.src_tokenizer.normalization == "NFKC"
    assert loaded.train_state["progress"]["update"] == 3
    slim = tmp_path / "slim.pt"
    replace(loaded, train_state=None).save(slim)  # what nmt average writes
    assert load_checkpoint(slim).train_state is None
    assert slim.stat().st_size < path.stat().st_size


def test_language_codes_are_kept_and_absent_in_older_checkpoints(joint_spm: Path, tmp_path: Path) -> None:
    tok = Tokenizer.load(joint_spm)
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path in paths:
        replace(make_checkpoint(tok, 1.0), languages=("en", "pt_BR")).save(path)
    assert load_checkpoint(paths[0]).languages == ("en", "pt_BR")
    assert average_checkpoints(paths).languages == ("en", "pt_BR")
    payload = torch.load(paths[0], weights_only=True)
    del payload["languages"]  # as written before languages were stored
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").languages is None


def test_averaging(joint_spm: Path, tmp_path: Path) -> None:
    tok = Tokenizer.load(joint_spm)
    paths = []
    for i, value in enumerate((1.0, 2.0, 6.0)):
        paths.append(tmp_path / f"{i}.pt")
        make_checkpoint(tok, value, {"x": 1}).save(paths[-1])
    averaged = average_checkpoints(paths)
    assert torch.allclose(averaged.model_state["w"], torch.full((2, 3), 3.0))
    assert averaged.model_state["steps"].item() == 7
    assert averaged.train_state is None
    other = Checkpoint(Config(), {"w": torch.zeros(3, 3), "steps": torch.tensor(1)}, tok, tok)
    other.save(tmp_path / "other.pt")
    with pytest.raises(NmtError, match="model or tokenizer differs"):
        average_checkpoints([paths[0], tmp_path / "other.pt"])


def test_bad_checkpoints(joint_spm: Path, tmp_path: Path) -> None:
    tok = Tokenizer.load(joint_spm)
    good = tmp_path / "good.pt"
    make_checkpoint(tok, 1.0).save(good)
    with pytest.raises(NmtError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(NmtError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(NmtError, match=r"garbage.pt: not an nmt checkpoint "
                                       r"\(not a file written by nmt train or nmt average\)$"):
        load_checkpoint(garbage)
    with pytest.raises(NmtError, match=r"truncated.pt: corrupt or truncated checkpoint "
                                       r"\((.{1,100}|.{1,100} \.\.\.)\)$") as caught:
        load_checkpoint(truncated)
    assert "\x1b" not in str(caught.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(NmtError, match="not an nmt checkpoint"):
        load_checkpoint(foreign)
    payload = torch.load(good, weights_only=True)
    payload["version"] = 99
    future = tmp_path / "future.pt"
    torch.save(payload, future)
    with pytest.raises(NmtError, match="format version 99 is not supported"):
        load_checkpoint(future)


def test_format_1_loads_for_transformers_and_is_refused_for_rnns(joint_spm: Path, tmp_path: Path) -> None:
    """Format 2 scales RNN embeddings by sqrt(dim): an older RNN file would load and translate wrongly."""
    tok = Tokenizer.load(joint_spm)
    for arch in ("transformer", "rnn"):
        config = Config()
        config.model.arch = arch
        path = tmp_path / f"{arch}.pt"
        Checkpoint(config, {"w": torch.zeros(1)}, tok, tok).save(path)
        payload = torch.load(path, weights_only=True)
        payload["version"] = 1
        torch.save(payload, path)
        if arch == "transformer":
            assert load_checkpoint(path).config.model.arch == "transformer"
        else:
            with pytest.raises(NmtError, match="RNN checkpoint of format 1"):
                load_checkpoint(path)


def test_code_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"format": "nmt-checkpoint", "x": Evil()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(NmtError, match="corrupt or truncated"):
        load_checkpoint(path)
