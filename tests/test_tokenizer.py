from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from nmt.errors import NmtError
from nmt.tokenizer import (
    AUTO,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    auto_vocab_size,
    normalize,
    parse_vocab_size,
    train_sentencepiece,
)

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


@pytest.mark.parametrize(("pairs", "size"), [
    (0, 2_000), (1_000, 2_000), (3_000, 3_000), (5_000, 5_000), (10_000, 7_500), (20_000, 10_000),
    (29_000, 11_500), (80_000, 15_000), (160_000, 17_500), (1_000_000, 24_000), (10_000_000, 32_000),
])
def test_auto_vocab_size_table(pairs: int, size: int) -> None:
    assert auto_vocab_size(pairs) == size


def test_parse_vocab_size() -> None:
    assert parse_vocab_size("auto") == parse_vocab_size(" AUTO ") == AUTO
    assert parse_vocab_size("8000") == 8000
    with pytest.raises(NmtError, match="vocabulary size must be a number of pieces or 'auto', got '8k'"):
        parse_vocab_size("8k")
    with pytest.raises(NmtError, match="got 'big'"):
        train_sentencepiece([Path("unused")], Path("unused"), vocab_size="big")


def random_words(path: Path, lines: int, seed: int = 0) -> Path:
    """Text of many distinct words: enough merges for any automatic size up to a few thousand."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    path.write_text("".join(" ".join("".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(4)) + "\n"
                            for _ in range(lines)), encoding="utf-8")
    return path


def test_auto_size_per_input_file_and_explicit_wins(tmp_path: Path) -> None:
    """Two files of 3,000 lines are 3,000 pairs: 3,000 pieces; a number given is used as it is."""
    files = [random_words(tmp_path / "a.txt", 3_000, seed=1), random_words(tmp_path / "b.txt", 3_000, seed=2)]
    summary = train_sentencepiece(files, tmp_path / "auto")
    assert Tokenizer.load(summary.model).vocab_size == summary.vocab_size == auto_vocab_size(3_000) == 3_000
    assert summary.vocab_reason.startswith("3,000 for 3,000 sentence pairs (")
    assert "nearest size" not in summary.vocab_reason
    explicit = train_sentencepiece(files, tmp_path / "explicit", vocab_size=500)
    assert Tokenizer.load(explicit.model).vocab_size == 500 and explicit.vocab_reason == ""


def test_auto_size_moves_to_what_sentencepiece_can_build(corpus_dir: Path, tmp_path: Path) -> None:
    """The toy corpus cannot make 2,000 pieces, and 2,500 distinct characters need more: no error either way."""
    few = train_sentencepiece([corpus_dir / "train.en"], tmp_path / "few")
    assert 260 < Tokenizer.load(few.model).vocab_size == few.vocab_size < 2_000
    assert few.vocab_reason.startswith("2,000 for 600 sentence pairs")
    assert few.vocab_reason.endswith(f"; {few.vocab_size:,}, the nearest size SentencePiece can build from this text")
    with pytest.raises(NmtError, match="more than this corpus can supply .* use --vocab-size auto"):
        train_sentencepiece([corpus_dir / "train.en"], tmp_path / "explicit", vocab_size=2_000)
    chars = [chr(0x4E00 + i) for i in range(2_500)]
    (tmp_path / "cjk.txt").write_text("".join(" ".join(chars[i:i + 50]) + "\n" for i in range(0, 2_500, 50)))
    many = train_sentencepiece([tmp_path / "cjk.txt"], tmp_path / "many")
    assert Tokenizer.load(many.model).vocab_size == many.vocab_size > 2_500 + 256


def test_an_id_table_gives_ids_through_pieces_and_survives_checkpoints(joint_spm: Path, tmp_path: Path) -> None:
    """An imported model's tokenizer: ids are positions in its table, pieces outside the table are <unk>, and
    decoding turns pieces the SentencePiece model lacks into words too."""
    import torch

    from nmt.checkpoint import Checkpoint, load_checkpoint
    from nmt.config import Config

    plain, text = Tokenizer.load(joint_spm), "ein mann läuft"
    found = [plain.id_to_piece(i) for i in plain.encode(text)]
    pieces = [plain.id_to_piece(i) for i in range(4, plain.vocab_size) if plain.id_to_piece(i) != found[1]]
    table = ["<pad>", "<unk>", "<s>", "</s>", *reversed(pieces), "▁zebra"]
    tokenizer = Tokenizer(plain.model_bytes, vocabulary=table)
    expected = [UNK_ID if p == found[1] else table.index(p) for p in found]
    assert tokenizer.encode(text) == tokenizer.encode_batch([text])[0] == expected and UNK_ID in expected
    assert tokenizer.vocab_size == len(table) and tokenizer.checksum != plain.checksum and tokenizer != plain
    word = next(p for p in pieces if p.startswith("▁") and p[1:].isalpha())
    assert tokenizer.decode([table.index(word), table.index("▁zebra"), EOS_ID]) == f"{word[1:]} zebra"
    Checkpoint(Config(), {"w": torch.zeros(1)}, tokenizer, tokenizer).save(tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.src_tokenizer == loaded.tgt_tokenizer == tokenizer
    with pytest.raises(NmtError, match="must start with <pad>, <unk>, <s>, </s>"):
        Tokenizer(plain.model_bytes, vocabulary=table[1:])
