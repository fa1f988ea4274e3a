"""prepare(): exact cleaning counts, the stored format, reopening, and safe writes."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import pytest

from conftest import make_parallel
from nmt.data import (
    CleanConfig,
    EncodedSplit,
    PreparedData,
    Sources,
    TableFile,
    TextFiles,
    TokenizerTraining,
    prepare,
)
from nmt.errors import NmtError
from nmt.tokenizer import Tokenizer, normalize, train_sentencepiece


def write_pairs(directory: Path, name: str, pairs: list[tuple[str, str]]) -> TextFiles:
    for index, suffix in ((0, "en"), (1, "de")):
        (directory / f"{name}.{suffix}").write_text("".join(p[index] + "\n" for p in pairs), encoding="utf-8")
    return TextFiles(directory / f"{name}.en", directory / f"{name}.de")


def unique_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(*make_parallel(n, seed), strict=True)))


@pytest.fixture
def tokenizers(joint_spm: Path) -> tuple[Tokenizer, Tokenizer]:
    tok = Tokenizer.load(joint_spm)
    return tok, tok


def memory_mapped(array: np.ndarray) -> bool:
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base is not None


def decoded(data: PreparedData, name: str) -> list[tuple[str, str]]:
    split = data.split(name)
    return [(data.src_tokenizer.decode(s), data.tgt_tokenizer.decode(t))
            for s, t in (split[i] for i in range(len(split)))]


def test_each_cleaning_rule_is_counted_exactly(tmp_path: Path, tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    base = unique_pairs(120, seed=5)[:100]
    valid = unique_pairs(10, seed=99)[:5]
    ratio_short = "a man walks with the young girl on the street in the park"
    tok = tokenizers[0]
    max_len = max(len(tok.encode(text)) for pair in [*base, (ratio_short, "")] for text in pair)
    long_side = " ".join(["dog"] * (max_len + 1))  # every word is at least one token
    train = base + [
        ("", "ein hund"), ("  \t ", "ein mann"), ("a dog", ""),  # empty: 3
        (base[0][0].replace(" ", "  "), base[0][1]), base[1], base[1],  # duplicate: 3 (whitespace is normalised)
        valid[0], valid[3],  # overlap: 2
        (long_side, long_side),  # too_long: 1
        ("dog", ratio_short), (ratio_short, "hund"),  # ratio: 2
    ]
    sources = Sources(write_pairs(tmp_path, "train", train), valid=write_pairs(tmp_path, "valid", valid))
    data = prepare(tmp_path / "data", sources, tokenizers, CleanConfig(max_len=max_len, max_ratio=3))
    assert data.meta["splits"]["train"]["counts"] == {
        "read": 111, "empty": 3, "duplicate": 3, "overlap": 2, "too_long": 1, "ratio": 2, "kept": 100,
    }
    assert decoded(data, "train") == base
    assert data.meta["splits"]["valid"]["counts"] == {"read": 5, "empty": 0, "duplicate": 0, "overlap": 0,
                                                      "too_long": 0, "ratio": 0, "kept": 5}

    loose = prepare(tmp_path / "loose", sources, tokenizers, CleanConfig(max_len=0, max_ratio=0, dedup=False))
    assert loose.meta["splits"]["train"]["counts"]["kept"] == 108  # only the 3 empty pairs dropped


def test_prepared_directory_reopens_memory_mapped(corpus_dir: Path, tmp_path: Path,
                                                  tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    sources = Sources(TextFiles(corpus_dir / "train.en", corpus_dir / "train.de"),
                      test=TextFiles(corpus_dir / "valid.en", corpus_dir / "valid.de"))
    prepare(tmp_path / "data", sources, tokenizers, max_tokens=256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary directory left
    data = PreparedData.open(tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json", "spm.model", "test", "train"]
    assert data.joint and data.src_tokenizer is data.tgt_tokenizer and data.src_tokenizer == tokenizers[0]
    assert data.splits == ["train", "test"] and data.has_split("test") and not data.has_split("valid")
    train = data.split("train")
    expected = list(dict.fromkeys(zip(*[(corpus_dir / f"train.{s}").read_text().splitlines() for s in ("en", "de")],
                                      strict=True)))
    assert decoded(data, "train") == expected
    assert memory_mapped(train[0][0]) and train[0][0].dtype == np.uint16
    assert train.src_lengths.tolist() == [len(train[i][0]) for i in range(len(train))]
    meta = data.meta
    assert meta["splits"]["train"]["src"]["tokens"] == int(train.src_lengths.sum())
    assert meta["splits"]["train"]["tgt"]["max"] == int(train.tgt_lengths.max())
    assert meta["tokenizer"]["src"]["sha256"] == tokenizers[0].checksum
    assert meta["padding"]["max_tokens"] == 256 and 0 <= meta["padding"]["fraction"] < 0.1
    sources_text, references = data.split("test").texts()
    assert references == (corpus_dir / "valid.de").read_text().splitlines()
    assert data.split("test").references() == references
    with pytest.raises(NmtError, match="keeps no texts"):
        train.texts()
    with pytest.raises(NmtError, match="no 'valid' split; it has train, test"):
        data.split("valid")


def test_normalisation_is_stored_and_returned_with_the_tokenizers(tmp_path: Path,
                                                                  tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    raw = [("the ﬁne  dog\truns ", "der Hund läuft"), ("a cafe\u0301", "ein Cafe\u0301")]
    sources = Sources(write_pairs(tmp_path, "train", unique_pairs(20, seed=3)),
                      valid=write_pairs(tmp_path, "valid", raw))
    data = prepare(tmp_path / "data", sources, tokenizers, CleanConfig(normalization="NFKC"))
    assert data.meta["normalization"] == "NFKC"
    assert data.src_tokenizer.normalization == data.tgt_tokenizer.normalization == "NFKC"
    texts, references = data.split("valid").texts()
    assert texts == ["the fine dog runs", "a café"]
    assert references == [t for _, t in raw]  # references stay raw, for sacreBLEU
    assert decoded(data, "valid") == [(normalize(s, "NFKC"), normalize(t, "NFKC")) for s, t in raw]


def test_tokenizer_trained_in_the_same_run(tmp_path: Path) -> None:
    rows = [f"{s}\t{t}" for s, t in zip(*make_parallel(300, seed=4), strict=True)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    sources = Sources(TableFile(tmp_path / "train.tsv"), carve={"valid": 20})
    data = prepare(tmp_path / "joint", sources, TokenizerTraining(vocab_size=300))
    assert data.joint and data.src_tokenizer.vocab_size == 300
    assert data.meta["tokenizer"]["trained"]["vocab_size"] == 300
    assert len(data.split("valid")) == 20
    separate = prepare(tmp_path / "sep", sources, TokenizerTraining(vocab_size=300, separate=True))
    assert not separate.joint and separate.src_tokenizer != separate.tgt_tokenizer
    assert sorted(p.name for p in (tmp_path / "sep").glob("*.model")) == ["src.model", "tgt.model"]


def test_carved_sets_are_deduplicated_against_train(tmp_path: Path, tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    pairs = unique_pairs(80, seed=8)[:60]
    sources = Sources(write_pairs(tmp_path, "train", pairs * 2), carve={"valid": 6, "test": 4}, split_seed=3)
    data = prepare(tmp_path / "data", sources, tokenizers)
    held_out = set(decoded(data, "valid")) | set(decoded(data, "test"))
    assert len(held_out) == 10 and not held_out & set(decoded(data, "train"))
    counts = data.meta["splits"]["train"]["counts"]
    assert counts["read"] == 110 and counts["overlap"] + counts["duplicate"] + counts["kept"] == 110
    assert data.meta["splits"]["valid"]["source"]["kind"] == "carved"


def test_output_is_never_half_written_or_clobbered(tmp_path: Path, tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    sources = Sources(write_pairs(tmp_path, "train", unique_pairs(30, seed=1)))
    out = tmp_path / "data"
    prepare(out, sources, tokenizers)
    with pytest.raises(NmtError, match="already exists .*--overwrite"):
        prepare(out, sources, tokenizers)
    prepare(out, sources, tokenizers, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(NmtError, match=r"mine: is not a folder written by nmt prepare \(no meta.json"):
        prepare(tmp_path / "mine", sources, tokenizers, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"

    (tmp_path / "bad.en").write_text("fine\n" * 5 + "\xff\n", encoding="latin-1")
    (tmp_path / "bad.de").write_text("gut\n" * 6)
    with pytest.raises(NmtError, match=r"bad\.en: line 6 is not valid UTF-8"):
        prepare(tmp_path / "broken", Sources(TextFiles(tmp_path / "bad.en", tmp_path / "bad.de")), tokenizers)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".broken", "broken"))]


def test_nothing_left_after_cleaning_is_an_error(tmp_path: Path, tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    sources = Sources(write_pairs(tmp_path, "train", [("a", ""), ("", "b")]))
    with pytest.raises(NmtError, match="no training pairs left after cleaning .*empty 2"):
        prepare(tmp_path / "data", sources, tokenizers)


def test_opening_damaged_or_foreign_data_fails_in_one_line(corpus_dir: Path, tmp_path: Path,
                                                             tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    with pytest.raises(NmtError, match="no such data directory"):
        PreparedData.open(tmp_path / "missing")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(NmtError, match=r"meta.json: is a file, not a directory written by `nmt prepare`$"):
        PreparedData.open(tmp_path / "meta.json")
    (tmp_path / "meta.json").unlink()
    with pytest.raises(NmtError, match="not a prepared data directory"):
        PreparedData.open(tmp_path)
    out = tmp_path / "data"
    prepare(out, Sources(write_pairs(tmp_path, "train", unique_pairs(40, seed=2))), tokenizers)
    other = train_sentencepiece([corpus_dir / "valid.en"], tmp_path / "other", vocab_size=290).model
    (out / "spm.model").write_bytes(other.read_bytes())
    with pytest.raises(NmtError, match="tokenizer does not match the one the data was encoded with"):
        PreparedData.open(out)
    (out / "spm.model").write_bytes(tokenizers[0].model_bytes)
    ids = out / "train" / "src.ids"
    ids.write_bytes(ids.read_bytes()[:-2])
    with pytest.raises(NmtError, match="src ids, offsets and lengths disagree"):
        PreparedData.open(out).split("train")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(NmtError, match="not nmt data format version 1"):
        PreparedData.open(out)


def test_in_memory_split_for_trainer_tests() -> None:
    split = EncodedSplit.from_lists([[5, 6], [7]], [[8], [9, 10, 11]], sources=["a b", "c"], references=["A", "B C"])
    assert len(split) == 2 and split[1][1].tolist() == [9, 10, 11] and split[-1][0].tolist() == [7]
    assert split.src_lengths.tolist() == [2, 1] and split.tgt_lengths.tolist() == [1, 3]
    assert split.texts() == (["a b", "c"], ["A", "B C"])
    with pytest.raises(IndexError):
        split[2]
