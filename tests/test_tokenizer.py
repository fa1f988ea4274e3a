from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from nmt.errors import NmtError
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, normalize, train_sentencepiece

TRICKY = [
    "ein Mann läuft auf der Straße",
    "Crème brûlée à la carte, naïve façade",
    "Ελληνικά κείμενα και русский текст",
    "日本語のテキストと中文",
    "emoji 🚲🐕‍🦺 and ✨ sparkle",
    "עברית ועربي",
]


def test_round_trip_on_normalised_text(joint_spm: Path) -> None:
    tok = Tokenizer.load(joint_spm)
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == normalize(text)
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_normalisation_nfc_nfkc_and_whitespace() -> None:
    decomposed = "Cafe\u0301  au\tlait "
    assert normalize(decomposed) == "Caf\u00e9 au lait"
    assert normalize("ﬁ ①", "NFKC") == "fi 1"
    assert normalize("ﬁ ①", "NFC") == "ﬁ ①"
    with pytest.raises(NmtError, match="normalisation"):
        normalize("x", "NFD")


def test_special_ids_fixed_and_same_for_joint_and_per_side(corpus_dir: Path, tmp_path: Path, joint_spm: Path) -> None:
    src = train_sentencepiece([corpus_dir / "train.en"], tmp_path / "src", vocab_size=290, model_type="unigram")
    tgt = train_sentencepiece([corpus_dir / "train.de"], tmp_path / "tgt", vocab_size=290)
    for model in (joint_spm, src.model, tgt.model):
        tok = Tokenizer.load(model)
        assert [tok.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)


def test_decode_drops_special_ids(joint_spm: Path) -> None:
    tok = Tokenizer.load(joint_spm)
    ids = tok.encode("a man runs")
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == "a man runs"


def test_gzip_input_sampling_and_user_symbols(corpus_dir: Path, tmp_path: Path) -> None:
    gz = tmp_path / "train.en.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write((corpus_dir / "train.en").read_text(encoding="utf-8"))
    summary = train_sentencepiece(
        [gz], tmp_path / "s", vocab_size=290, sample_size=100, user_defined_symbols=["<2de>"]
    )
    assert summary.sentences_read == 600
    assert summary.sentences_used == 100
    tok = Tokenizer.load(summary.model)
    assert "<2de>" in [tok.id_to_piece(i) for i in tok.encode("<2de> a man")]
    assert summary.vocab.read_text(encoding="utf-8").count("\n") == 290


def test_sampling_is_seeded(corpus_dir: Path, tmp_path: Path) -> None:
    a = train_sentencepiece([corpus_dir / "train.en"], tmp_path / "a", vocab_size=290, sample_size=50, seed=3)
    b = train_sentencepiece([corpus_dir / "train.en"], tmp_path / "b", vocab_size=290, sample_size=50, seed=3)
    assert a.model.read_bytes() == b.model.read_bytes()


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (None, {}, "no such file"),
        (b"", {}, "file is empty"),
        (b"ok line\n\xff\xfe broken\n", {}, "line 2 is not valid UTF-8"),
        (b"a b c\n", {"vocab_size": 5000}, "more than this corpus can supply"),
        (b"a b c\n", {"model_type": "wordpiece"}, "unknown model type"),
        (b"a b c\n", {"vocab_size": 100},
         r"vocabulary size 100 is too small: this corpus needs \d+ pieces .* raise --vocab-size$"),
        (b"a b c\n", {"character_coverage": 0.5}, "character coverage must be between 0.98 and 1.0, got 0.5"),
        (b"a b c\n", {"sample_size": -1}, "sample size must be 0 .* got -1"),
        (b"a b c\n", {"user_defined_symbols": [""]},
         "user-defined symbols must be non-empty and without spaces, got ''"),
    ],
)
def test_errors_leave_no_model(tmp_path: Path, content: bytes | None, kwargs: dict, message: str) -> None:
    path = tmp_path / "in.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NmtError, match=message):
        train_sentencepiece([path], tmp_path / "out", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["in.txt"])


def test_foreign_special_ids_rejected(tmp_path: Path, corpus_dir: Path) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(corpus_dir / "train.en"), model_prefix=str(tmp_path / "plain"), vocab_size=40, minloglevel=2
    )
    with pytest.raises(NmtError, match="special ids"):
        Tokenizer.load(tmp_path / "plain.model")
    with pytest.raises(NmtError, match="not a valid SentencePiece model"):
        Tokenizer(b"garbage")
    (tmp_path / "s.en").write_text("a man\n")
    with pytest.raises(NmtError, match=r"s.en: not a valid SentencePiece model "
                                       r"\(expected a .model file from nmt tokenizer\)"):
        Tokenizer.load(tmp_path / "s.en")


def test_an_existing_model_is_kept_unless_overwrite(corpus_dir: Path, tmp_path: Path) -> None:
    first = train_sentencepiece([corpus_dir / "train.en"], tmp_path / "m", vocab_size=290).model
    before = first.read_bytes()
    with pytest.raises(NmtError, match=r"m.model: already exists \(use --overwrite to replace it\)"):
        train_sentencepiece([corpus_dir / "train.de"], tmp_path / "m", vocab_size=290)
    assert first.read_bytes() == before
    train_sentencepiece([corpus_dir / "train.de"], tmp_path / "m", vocab_size=290, overwrite=True)
    assert first.read_bytes() != before
