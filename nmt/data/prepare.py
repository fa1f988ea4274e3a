"""`prepare`: raw parallel text to an encoded, memory-mapped data directory, in three phases.

1. read and clean: each split is read once and normalised; training pairs are
   filtered on text (empty, duplicate, overlap) and the survivors written to
   scratch files; valid/test texts also go to their texts.jsonl;
2. tokenizer: the given one is copied in, or one is trained on the cleaned
   training text;
3. encode: the scratch text is encoded in chunks, SentencePiece spreading each
   chunk over the cores; training pairs are filtered on length and ratio.
Everything happens in a temporary directory that is renamed onto the output
only at the end, so an interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nmt import __version__
from nmt.data.clean import CleanConfig, Cleaner, Counts, normalize_pairs, pair_key
from nmt.data.sampler import TokenBatchSampler, padding_fraction
from nmt.data.sources import PairSource, TextFiles, carve, chunked, corpus_languages
from nmt.data.store import (
    FORMAT,
    FORMAT_VERSION,
    META,
    TEXTS,
    EncodedSplit,
    PreparedData,
    SplitWriter,
    ids_dtype,
    tokenizer_files,
)
from nmt.errors import NmtError
from nmt.id_table import vocabulary_file, write_table
from nmt.io import OutputFolder, atomic_dir, read_json
from nmt.progress import SILENT, Reporter
from nmt.tokenizer import AUTO, Tokenizer, VocabSize, train_sentencepiece

HELD_OUT = ("valid", "test")


def _is_meta(path: Path) -> bool:
    try:
        meta = read_json(path, max_bytes=64 << 20)
    except NmtError:
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


_TOKENIZER_FILES = {*tokenizer_files(True).values(), *tokenizer_files(False).values()}
PREPARED_FOLDER = OutputFolder("nmt prepare", META, {META, "train", *HELD_OUT, *_TOKENIZER_FILES,
                                                    *map(vocabulary_file, _TOKENIZER_FILES)}.__contains__, _is_meta)


@dataclass
class Sources:
    """Where each split comes from; valid/test may instead be carved out of train."""

    train: PairSource
    valid: PairSource | None = None
    test: PairSource | None = None
    carve: dict[str, int] = field(default_factory=dict)  # "valid"/"test" -> pairs taken from train
    split_seed: int = 1
    src_lang: str | None = None  # language codes as given; with neither, the training files' suffixes are read
    tgt_lang: str | None = None
    languages: tuple[str, str] | None = field(init=False, default=None)  # what meta.json stores

    def __post_init__(self) -> None:
        self.languages = corpus_languages(self.src_lang, self.tgt_lang, self.train)
        for name, count in self.carve.items():
            if name not in HELD_OUT or count < 1:
                raise NmtError(f"can only carve a positive number of valid/test pairs, got {name}={count}")
            if getattr(self, name) is not None:
                raise NmtError(f"the {name} set is given and also to be carved out of train: choose one")


@dataclass
class TokenizerTraining:
    """Train SentencePiece on the cleaned training text instead of using a given model."""

    vocab_size: VocabSize = AUTO  # AUTO: from the number of training pairs left after cleaning
    model_type: str = "bpe"
    separate: bool = False  # one model per side instead of a joint one
    seed: int = 1


Tokenizers = tuple[Tokenizer, Tokenizer] | TokenizerTraining


def prepare(
    out: Path,
    sources: Sources,
    tokenizers: Tokenizers,
    clean: CleanConfig | None = None,
    *,
    overwrite: bool = False,
    max_tokens: int = 4096,
    num_threads: int = 0,
    chunk_size: int = 10_000,
    reporter: Reporter = SILENT,
) -> PreparedData:
    """Write the prepared data directory `out` and open it; `max_tokens` only sets the padding estimate."""
    start = time.perf_counter()
    out, clean = Path(out), clean or CleanConfig()
    with atomic_dir(out, overwrite, kind=PREPARED_FOLDER) as tmp:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        splits = _resolve_splits(sources, reporter)
        counts, cleaner = _read_splits(splits, tmp, scratch, clean, chunk_size, reporter)
        src_tok, tgt_tok, vocab_reason = _tokenizers(tokenizers, scratch, clean.normalization, num_threads, reporter)
        joint = src_tok == tgt_tok
        dtype = ids_dtype(max(src_tok.vocab_size, tgt_tok.vocab_size))
        stats = {}
        for name in splits:
            filter_lengths = cleaner.filter_lengths if name == "train" else None
            stats[name] = _encode(name, scratch, tmp / name, (src_tok, tgt_tok), dtype, filter_lengths,
                                  num_threads, chunk_size, reporter)
        for name in HELD_OUT:
            if name in counts:
                counts[name].kept = counts[name].read
        shutil.rmtree(scratch)
        stored = _store_tokenizers(tmp, (src_tok, tgt_tok), joint)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "nmt_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "normalization": clean.normalization,
            "languages": dict(zip(("src", "tgt"), sources.languages, strict=True)) if sources.languages else None,
            "dtype": dtype.name,
            "tokenizer": {
                "joint": joint,
                "trained": ({**asdict(tokenizers), "vocab_reason": vocab_reason}
                            if isinstance(tokenizers, TokenizerTraining) else None),
                **stored,
            },
            "cleaning": clean.to_dict(),
            "splits": {name: {"source": splits[name].describe(), "counts": counts[name].to_dict(), **stats[name]}
                       for name in splits},
            "padding": _padding_estimate(EncodedSplit.load(tmp / "train", dtype), max_tokens),
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return PreparedData.open(out)


def checkpoint_tokenizers(path: Path, normalization: str | None = None) -> tuple[Tokenizer, Tokenizer]:
    """A checkpoint's tokenizers (`nmt prepare --tokenizer-from`), so that `nmt train --init-from` finds the data
    encoded exactly as the checkpoint was; the data takes their normalisation, which `normalization` may only
    repeat."""
    from nmt.checkpoint import load_checkpoint  # imported here: only this way of preparing reads checkpoints

    checkpoint = load_checkpoint(path)
    stored = checkpoint.src_tokenizer.normalization
    if normalization is not None and normalization != stored:
        raise NmtError(f"{path}: its tokenizers normalise with {stored}, not {normalization}; "
                       "drop --normalization to use theirs")
    return checkpoint.src_tokenizer, checkpoint.tgt_tokenizer


def _store_tokenizers(folder: Path, tokenizers: tuple[Tokenizer, Tokenizer], joint: bool) -> dict[str, Any]:
    """Copy each side's SentencePiece model (one file when joint) and an imported model's id table into the
    data folder; what meta.json says of each side."""
    files, meta = tokenizer_files(joint), {}
    for side, tokenizer in zip(("src", "tgt"), tokenizers, strict=True):
        (folder / files[side]).write_bytes(tokenizer.model_bytes)
        meta[side] = {"file": files[side], "sha256": tokenizer.checksum, "vocab_size": tokenizer.vocab_size}
        if tokenizer.vocabulary is not None:
            meta[side]["vocabulary"] = vocabulary_file(files[side])
            write_table(folder / meta[side]["vocabulary"], tokenizer.vocabulary)
    return meta


def _read_splits(splits: dict[str, PairSource], tmp: Path, scratch: Path, clean: CleanConfig, chunk_size: int,
                 reporter: Reporter) -> tuple[dict[str, Counts], Cleaner]:
    """Held-out splits first, so that their pairs are then kept out of train; train through the cleaner."""
    counts: dict[str, Counts] = {}
    held_out: set[bytes] = set()
    for name in HELD_OUT:
        if name in splits:
            counts[name] = _read_held_out(name, splits[name], tmp, scratch, clean, held_out, chunk_size, reporter)
    cleaner = Cleaner(clean, frozenset(held_out))
    _read_train(splits["train"], cleaner, scratch, chunk_size, reporter)
    counts["train"] = cleaner.counts
    return counts, cleaner


def _padding_estimate(train: EncodedSplit, max_tokens: int) -> dict[str, float]:
    """How much of a `max_tokens` batch is padding, for the summary (the sampler of epoch 1, seed 1)."""
    batches = TokenBatchSampler(train.src_lengths, train.tgt_lengths, max_tokens, seed=1).batches(1)
    return {"max_tokens": max_tokens, "batches": len(batches),
            "fraction": round(padding_fraction(batches, train.src_lengths, train.tgt_lengths), 4)}


def _resolve_splits(sources: Sources, reporter: Reporter) -> dict[str, PairSource]:
    splits: dict[str, PairSource] = {"train": sources.train}
    if sources.carve:
        carved, splits["train"] = carve(sources.train, sources.carve, sources.split_seed, reporter)
        splits.update(carved)
    for name in HELD_OUT:
        given = getattr(sources, name)
        if given is not None:
            splits[name] = given
    return splits


def _read_held_out(name: str, source: PairSource, tmp: Path, scratch: Path, clean: CleanConfig,
                   held_out: set[bytes], chunk_size: int, reporter: Reporter) -> Counts:
    """Normalise a valid/test split, keep its texts, and note its pairs for the overlap rule."""
    advance = reporter.task(f"reading {name}", source.size(), "pairs")
    counts = Counts()
    (tmp / name).mkdir()
    with _ScratchWriter(scratch, name) as writer, (tmp / name / TEXTS).open("w", encoding="utf-8") as texts:
        for chunk in chunked(iter(source), chunk_size):
            pairs = normalize_pairs(chunk, clean.normalization)
            writer.write(pairs)
            texts.writelines(json.dumps({"src": src, "ref": raw_tgt}, ensure_ascii=False) + "\n"
                             for (src, _), (_, raw_tgt) in zip(pairs, chunk, strict=True))
            if clean.dedup:
                held_out.update(pair_key(s, t) for s, t in pairs)
            counts.read += len(chunk)
            advance(len(chunk))
    if not counts.read:
        raise NmtError(f"the {name} set has no pairs")
    return counts


def _read_train(source: PairSource, cleaner: Cleaner, scratch: Path, chunk_size: int, reporter: Reporter) -> None:
    advance = reporter.task("reading and cleaning train", source.size(), "pairs")
    with _ScratchWriter(scratch, "train") as writer:
        for chunk in chunked(iter(source), chunk_size):
            writer.write(cleaner.filter_text(chunk))
            advance(len(chunk))
    if writer.count == 0:
        raise NmtError(f"no training pairs left after cleaning ({_dropped(cleaner.counts)})")


def _dropped(counts: Counts) -> str:
    return f"read {counts.read:,}; " + ", ".join(f"{reason} {n:,}" for reason, n in counts.dropped.items())


class _ScratchWriter:
    """Normalised pairs of one split as two text files, for the tokenizer trainer and the encoder."""

    def __init__(self, scratch: Path, name: str) -> None:
        self.paths = (scratch / f"{name}.src", scratch / f"{name}.tgt")
        self.count = 0

    def __enter__(self) -> _ScratchWriter:
        self._files = [p.open("w", encoding="utf-8") for p in self.paths]
        return self

    def write(self, pairs: list[tuple[str, str]]) -> None:
        for handle, side in zip(self._files, zip(*pairs, strict=True), strict=False):
            handle.writelines(text + "\n" for text in side)
        self.count += len(pairs)

    def __exit__(self, *exc: object) -> None:
        for handle in self._files:
            handle.close()


def _tokenizers(tokenizers: Tokenizers, scratch: Path, normalization: str, num_threads: int,
                reporter: Reporter) -> tuple[Tokenizer, Tokenizer, str]:
    """The given tokenizers (used with the data's normalisation), or new ones trained on train; then why
    their vocabulary size, when it was chosen automatically."""
    if not isinstance(tokenizers, TokenizerTraining):
        return (*(Tokenizer(t.model_bytes, normalization, t.vocabulary)  # type: ignore[return-value]
                  for t in tokenizers), "")
    spec = tokenizers
    groups = ([("src", ["train.src"]), ("tgt", ["train.tgt"])] if spec.separate
              else [("spm", ["train.src", "train.tgt"])])
    trained, reasons = [], []
    for prefix, names in groups:
        summary = train_sentencepiece(
            [scratch / n for n in names], scratch / prefix, vocab_size=spec.vocab_size, model_type=spec.model_type,
            normalization=normalization, seed=spec.seed, num_threads=num_threads, reporter=reporter,
        )
        trained.append(Tokenizer.load(summary.model, normalization))
        reasons.append(summary.vocab_reason)
    return trained[0], trained[-1], "; ".join(dict.fromkeys(r for r in reasons if r))  # once if the sides agree


LengthFilter = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], list[bool]]


def _encode(name: str, scratch: Path, directory: Path, tokenizers: tuple[Tokenizer, Tokenizer], dtype: Any,
            filter_lengths: LengthFilter | None, num_threads: int, chunk_size: int,
            reporter: Reporter) -> dict[str, Any]:
    """Encode one split's scratch text into its directory; returns its length statistics."""
    pairs = TextFiles(scratch / f"{name}.src", scratch / f"{name}.tgt")
    advance = reporter.task(f"encoding {name}", pairs.size(), "pairs")
    writer = SplitWriter(directory, dtype)
    for chunk in chunked(iter(pairs), chunk_size):
        src = tokenizers[0].encode_batch([s for s, _ in chunk], num_threads)
        tgt = tokenizers[1].encode_batch([t for _, t in chunk], num_threads)
        if filter_lengths is not None:
            keep = filter_lengths(src, tgt)
            src = [ids for ids, k in zip(src, keep, strict=True) if k]
            tgt = [ids for ids, k in zip(tgt, keep, strict=True) if k]
        writer.add(src, tgt)
        advance(len(chunk))
    stats = writer.close()
    if not stats["examples"]:
        raise NmtError(f"no {name} pairs left after the length rules (max_len, max_ratio)")
    return stats
