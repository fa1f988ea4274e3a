"""SentencePiece training and the `Tokenizer` every other module uses.

The special ids are fixed here, once: every model trained by `nmt tokenizer`
has <pad>=0, <unk>=1, <s>=2, </s>=3, so models, search and data code can use
the constants below without asking the tokenizer.

Text is normalised in Python (Unicode NFC or NFKC, whitespace collapsed) and
SentencePiece is trained with its identity rule, so `decode(encode(s)) == s`
holds exactly for normalised text; byte fallback keeps unseen characters
(emoji, rare scripts) instead of mapping them to <unk>.

An imported model (nmt.importers) keeps its own SentencePiece models, whose ids are
not the model's: its tokenizer carries an id table (the model's pieces in id order,
<pad>, <unk>, <s>, </s> first), and pieces map to ids through it, unknown ones to <unk>,
exactly as the original toolkit's tokenizer maps them.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import re
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

from nmt.errors import NmtError
from nmt.io import atomic_path, ensure_writable_dir, read_lines
from nmt.progress import SILENT, Reporter

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)

NORMALIZATIONS = ("NFC", "NFKC")
MODEL_TYPES = ("bpe", "unigram")
_SPACES = re.compile(r"\s+")

AUTO = "auto"  # a vocabulary size chosen from the corpus (`auto_vocab_size`)
AUTO_VOCAB_RANGE = (2_000, 32_000)
VocabSize = int | str  # a number of pieces, or AUTO


def parse_vocab_size(text: str) -> VocabSize:
    """`--vocab-size` as given on the command line: AUTO or a number of pieces."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise NmtError(f"vocabulary size must be a number of pieces or {AUTO!r}, got {text!r}") from None


def auto_vocab_size(pairs: int) -> int:
    """The vocabulary size for a corpus of `pairs` sentence pairs: 5,000 at 5k pairs and 2,500 more for each
    doubling (7,500 at 10k, 10,000 at 20k, 15,000 at 80k), rounded to 500, within AUTO_VOCAB_RANGE.

    Small corpora want small vocabularies: frequent pieces are learnt from more examples
    (Sennrich & Zhang 2019). Araabi & Monz 2020 ("Optimizing Transformer for Low-Resource
    NMT") found about 5k merges best at 5k pairs, 10k at 10-20k and 15k from 80k pairs on;
    the line through those points in log(pairs) is this rule. Beyond 80k it keeps growing
    to the 32k of large-scale systems.
    """
    low, high = AUTO_VOCAB_RANGE
    if pairs < 1:
        return low
    size = 5_000 + 2_500 * math.log2(pairs / 5_000)
    return min(max(round(size / 500) * 500, low), high)


def _auto_reason(pairs: int, characters: int) -> str:
    return (f"{auto_vocab_size(pairs):,} for {pairs:,} sentence pairs ({characters:,} characters): "
            f"5,000 at 5k pairs, +2,500 per doubling, rounded to 500, within "
            f"{AUTO_VOCAB_RANGE[0]:,}-{AUTO_VOCAB_RANGE[1]:,}")


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode-normalise and collapse whitespace: the one text normalisation of nmt."""
    if form not in NORMALIZATIONS:
        raise NmtError(f"unknown normalisation {form!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return _SPACES.sub(" ", unicodedata.normalize(form, text)).strip()


class Tokenizer:
    """A SentencePiece model plus the text normalisation applied before it, and an optional id table."""

    def __init__(self, model_bytes: bytes, normalization: str = "NFC",
                 vocabulary: Sequence[str] | None = None) -> None:
        if normalization not in NORMALIZATIONS:
            raise NmtError(f"unknown normalisation {normalization!r}")
        self.model_bytes = bytes(model_bytes)
        self.normalization = normalization
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_bytes)
        except (RuntimeError, OSError):
            raise NmtError("not a valid SentencePiece model") from None
        self.vocabulary = None if vocabulary is None else tuple(str(piece) for piece in vocabulary)
        self._ids = None if self.vocabulary is None else _id_table(self.vocabulary)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if self.vocabulary is None and ids != SPECIAL_IDS:
            raise NmtError(
                f"SentencePiece model has special ids pad/unk/bos/eos={ids}, "
                f"expected {SPECIAL_IDS}: train it with `nmt tokenizer`"
            )

    @classmethod
    def load(cls, path: Path, normalization: str = "NFC", vocabulary: Sequence[str] | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise NmtError(f"{path}: no such tokenizer model")
        try:
            return cls(path.read_bytes(), normalization, vocabulary)
        except NmtError as exc:
            raise NmtError(f"{path}: {exc} (expected a .model file from nmt tokenizer)") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() if self.vocabulary is None else len(self.vocabulary)

    @property
    def checksum(self) -> str:
        """SHA-256 of the model bytes (and of the id table, if any): identifies the tokenizer data was encoded with."""
        digest = hashlib.sha256(self.model_bytes)
        if self.vocabulary is not None:
            digest.update("\n".join(self.vocabulary).encode("utf-8"))
        return digest.hexdigest()

    def normalize(self, text: str) -> str:
        return normalize(text, self.normalization)

    def encode(self, text: str) -> list[int]:
        """Normalise and encode to ids, without BOS/EOS (callers add what they need)."""
        if self._ids is None:
            return self._sp.encode(self.normalize(text))
        return self._table_ids(self._sp.encode(self.normalize(text), out_type=str))

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Encode many texts at once; SentencePiece spreads them over `num_threads` (0 = all)."""
        normalized = [self.normalize(t) for t in texts]
        if self._ids is None:
            return self._sp.encode(normalized, num_threads=num_threads)
        return [self._table_ids(pieces) for pieces in self._sp.encode(normalized, out_type=str,
                                                                      num_threads=num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text, dropping special ids (pad, bos, eos) wherever they stand."""
        kept = [i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)]
        if self.vocabulary is None:
            return self._sp.decode(kept)
        # a shared table holds the other side's pieces too, which SentencePiece returns verbatim: their word
        # marks made spaces, as Hugging Face's MarianTokenizer does
        return self._sp.decode_pieces([self.vocabulary[i] for i in kept]).replace("\u2581", " ").strip()

    def id_to_piece(self, index: int) -> str:
        return self._sp.id_to_piece(index) if self.vocabulary is None else self.vocabulary[index]

    def _table_ids(self, pieces: list[str]) -> list[int]:
        assert self._ids is not None
        return [self._ids.get(piece, UNK_ID) for piece in pieces]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Tokenizer)
            and self.model_bytes == other.model_bytes
            and self.normalization == other.normalization
            and self.vocabulary == other.vocabulary
        )

    __hash__ = None  # type: ignore[assignment]


def _id_table(vocabulary: tuple[str, ...]) -> dict[str, int]:
    """piece -> id of an imported model's id table, which must put nmt's special pieces at nmt's special ids."""
    if vocabulary[: len(SPECIAL_IDS)] != (PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE):
        raise NmtError(f"an id table must start with {PAD_PIECE}, {UNK_PIECE}, {BOS_PIECE}, {EOS_PIECE}, "
                       f"got {', '.join(vocabulary[:4])}")
    table = {piece: index for index, piece in enumerate(vocabulary)}
    if len(table) != len(vocabulary):
        raise NmtError("an id table holds a piece twice")
    return table


@dataclass
class TrainingSummary:
    """What `train_sentencepiece` did, for the summary table."""

    model: Path
    vocab: Path
    vocab_size: int  # the size trained, also when it was chosen automatically
    model_type: str
    character_coverage: float
    sentences_read: int
    sentences_used: int
    seconds: float
    inputs: list[Path] = field(default_factory=list)
    vocab_reason: str = ""  # why this size, when it was chosen automatically


def _sample_sentences(
    files: Sequence[Path], sample_size: int, form: str, seed: int, reporter: Reporter
) -> tuple[list[str], int]:
    """Read and normalise every non-empty line; keep a seeded reservoir sample if asked."""
    rng = random.Random(seed)
    kept: list[str] = []
    read = 0
    for path in files:
        advance = reporter.task(f"reading {Path(path).name}", None, "lines")
        for line in read_lines(path):
            advance(1)
            text = normalize(line, form)
            if not text:
                continue
            read += 1
            if sample_size <= 0 or len(kept) < sample_size:
                kept.append(text)
            else:
                slot = rng.randrange(read)
                if slot < sample_size:
                    kept[slot] = text
    return kept, read


def train_sentencepiece(
    files: Sequence[Path],
    prefix: Path,
    *,
    vocab_size: VocabSize = AUTO,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    sample_size: int = 0,
    user_defined_symbols: Sequence[str] = (),
    normalization: str = "NFC",
    byte_fallback: bool = True,
    seed: int = 1,
    num_threads: int = 0,
    overwrite: bool = False,
    reporter: Reporter = SILENT,
) -> TrainingSummary:
    """Train a SentencePiece model on text files, writing `<prefix>.model` and `<prefix>.vocab`.

    `sample_size` > 0 trains on a seeded random sample of that many sentences,
    for corpora too large to hold. Both output files appear only when training
    succeeded. `vocab_size` AUTO takes `auto_vocab_size` of the sentences per input
    file (one file per side of a parallel corpus), moved to the nearest size SentencePiece
    can build from this text, and says why in the summary's `vocab_reason`.
    """
    _check_training_options(files, vocab_size, model_type, character_coverage, sample_size, user_defined_symbols)
    prefix = Path(prefix)
    ensure_writable_dir(prefix.parent)
    if Path(f"{prefix}.model").exists() and not overwrite:
        raise NmtError(f"{prefix}.model: already exists (use --overwrite to replace it)")
    start = time.perf_counter()
    spm.set_random_generator_seed(seed)
    sentences, read = _sample_sentences(files, sample_size, normalization, seed, reporter)
    if not sentences:
        raise NmtError("the input files hold no text")
    model_path, vocab_path = Path(f"{prefix}.model"), Path(f"{prefix}.vocab")
    options = {"model_type": model_type, "character_coverage": character_coverage,
               "user_defined_symbols": list(user_defined_symbols), "byte_fallback": byte_fallback,
               "num_threads": num_threads or os.cpu_count() or 1}
    if vocab_size == AUTO:
        pairs = read // len(files)
        vocab_reason = _auto_reason(pairs, sum(map(len, sentences)))
        vocab_size, model_bytes = _train_auto(sentences, auto_vocab_size(pairs), reporter, options)
        if vocab_size != auto_vocab_size(pairs):
            vocab_reason += f"; {vocab_size:,}, the nearest size SentencePiece can build from this text"
    else:
        vocab_reason, model_bytes = "", _run_trainer(_feed(sentences, reporter), vocab_size=vocab_size, **options)
    with atomic_path(model_path) as tmp_model, atomic_path(vocab_path) as tmp_vocab:
        tmp_model.write_bytes(model_bytes)
        tmp_vocab.write_text(_vocab_listing(model_bytes), encoding="utf-8")
    return TrainingSummary(
        model=model_path,
        vocab=vocab_path,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        sentences_read=read,
        sentences_used=len(sentences),
        seconds=time.perf_counter() - start,
        inputs=[Path(f) for f in files],
        vocab_reason=vocab_reason,
    )


def _feed(sentences: list[str], reporter: Reporter) -> Iterator[str]:
    """The sentences for SentencePiece's trainer, advancing a progress bar as it reads them."""
    advance = reporter.task("training SentencePiece", len(sentences), "sentences")
    for text in sentences:
        advance(1)
        yield text


def _train_auto(sentences: list[str], size: int, reporter: Reporter, options: dict[str, object]) -> tuple[int, bytes]:
    """Train at `size`, or, when the text cannot make that many pieces (or needs more for its characters),
    at the size SentencePiece names instead: an automatic size adapts rather than fails."""
    try:
        return size, _run_trainer(_feed(sentences, reporter), vocab_size=size, **options)
    except _SizeError as exc:
        return exc.supported, _run_trainer(_feed(sentences, reporter), vocab_size=exc.supported, **options)


def _check_training_options(files: Sequence[Path], vocab_size: VocabSize, model_type: str,
                            character_coverage: float, sample_size: int, user_defined_symbols: Sequence[str]) -> None:
    """One-line errors for what SentencePiece would reject with its internal messages (or accept wrongly)."""
    if model_type not in MODEL_TYPES:
        raise NmtError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if isinstance(vocab_size, str):
        if vocab_size != AUTO:
            raise NmtError(f"vocabulary size must be a number of pieces or {AUTO!r}, got {vocab_size!r}")
    elif vocab_size < len(SPECIAL_IDS) + 1:
        raise NmtError(f"vocabulary size {vocab_size} is too small")
    if not 0.98 <= character_coverage <= 1.0:  # SentencePiece's own range
        raise NmtError(f"character coverage must be between 0.98 and 1.0, got {character_coverage}")
    if sample_size < 0:
        raise NmtError(f"sample size must be 0 (all sentences) or positive, got {sample_size}")
    if bad := [s for s in user_defined_symbols if not s or any(c.isspace() for c in s)]:
        raise NmtError(f"user-defined symbols must be non-empty and without spaces, got {bad[0]!r}")
    if not files:
        raise NmtError("no input files given")


def _run_trainer(sentences: Iterator[str], **options: object) -> bytes:
    """SentencePiece's trainer with nmt's fixed special ids and identity normalisation (nmt normalises first)."""
    model_proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model_proto,
            normalization_rule_name="identity",
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=PAD_PIECE, unk_piece=UNK_PIECE, bos_piece=BOS_PIECE, eos_piece=EOS_PIECE,
            hard_vocab_limit=True,
            minloglevel=2,
            **options,
        )
    except RuntimeError as exc:
        raise _training_error(exc, int(options["vocab_size"])) from None  # type: ignore[call-overload]
    return model_proto.getvalue()


def _vocab_listing(model_bytes: bytes) -> str:
    """The `.vocab` file SentencePiece would write: one `piece<TAB>score` line per id."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


class _SizeError(NmtError):
    """SentencePiece cannot build `vocab_size` pieces from this text, but can build `supported`."""

    def __init__(self, message: str, supported: int) -> None:
        super().__init__(message)
        self.supported = supported


def _training_error(exc: RuntimeError, vocab_size: int) -> NmtError:
    """Turn SentencePiece's multi-line internal errors into one sentence."""
    message = str(exc)
    limit = re.search(r"<=\s*(\d+)", message)
    if "Vocabulary size" in message and limit:
        return _SizeError(
            f"vocabulary size {vocab_size} is more than this corpus can supply "
            f"(at most {limit.group(1)}); lower --vocab-size, use --vocab-size auto or add data", int(limit.group(1))
        )
    chars = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if chars:
        return _SizeError(
            f"vocabulary size {vocab_size} is too small: this corpus needs {chars.group(2)} pieces for its characters "
            f"(and the 256 byte pieces of byte fallback); raise --vocab-size", int(chars.group(2))
        )
    last = message.strip().splitlines()[-1] if message.strip() else "unknown error"
    return NmtError(f"SentencePiece training failed: {last.rsplit('] ', 1)[-1]}")  # without its source location
