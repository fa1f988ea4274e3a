"""The prepared-data directory: flat token arrays with offsets, memory-mapped on open.

Layout of a directory written by `nmt prepare`:

    meta.json                 sources, cleaning settings and counts, tokenizer checksums, statistics
    spm.model                 the joint tokenizer (or src.model and tgt.model, one per side)
    train/ valid/ test/       one folder per split, each with
        src.ids  tgt.ids      every example's token ids end to end (raw little-endian, dtype in meta.json)
        src.offsets.npy       int64 (N + 1,): example i is ids[offsets[i]:offsets[i + 1]]
        tgt.offsets.npy
        src.lengths.npy       int32 (N,): tokens per example, what the batch sampler reads
        tgt.lengths.npy
        texts.jsonl           valid and test only: {"src": normalised source, "ref": raw reference}

Ids carry no BOS/EOS. Opening is O(1): every array is a memory map, so the
trainer starts at once and the page cache is shared between DDP processes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nmt.data.batch import Batch, terminated
from nmt.errors import NmtError
from nmt.id_table import read_table
from nmt.tokenizer import PAD_ID, Tokenizer

FORMAT = "nmt-data"
FORMAT_VERSION = 1
META = "meta.json"
TEXTS = "texts.jsonl"
SIDES = ("src", "tgt")


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: half the disk and page cache of int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class _Side:
    """One side of a split: all ids end to end, offsets and lengths."""

    ids: np.ndarray  # (total_tokens,)
    offsets: np.ndarray  # (N + 1,) int64
    lengths: np.ndarray  # (N,) int32

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> _Side:
        lengths = np.array([len(r) for r in rows], dtype=np.int32)
        offsets = offsets_of(lengths)
        ids = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
        return cls(ids, offsets, lengths)

    @classmethod
    def load(cls, directory: Path, side: str, dtype: np.dtype) -> _Side:
        try:
            offsets = np.load(directory / f"{side}.offsets.npy", mmap_mode="r")
            lengths = np.load(directory / f"{side}.lengths.npy", mmap_mode="r")
            ids_path = directory / f"{side}.ids"
            count = ids_path.stat().st_size // dtype.itemsize
            ids = np.memmap(ids_path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
        except (OSError, ValueError) as exc:
            raise NmtError(f"{directory}: damaged or incomplete split ({exc})") from None
        if len(offsets) != len(lengths) + 1 or (len(offsets) and int(offsets[-1]) != count):
            raise NmtError(f"{directory}: {side} ids, offsets and lengths disagree; prepare the data again")
        # Plain ndarray views of the same maps: np.memmap's Python-level __getitem__ costs 5x more per example.
        return cls(np.asarray(ids), np.asarray(offsets), np.asarray(lengths))

    def __getitem__(self, index: int) -> np.ndarray:
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def padded(self, rows: np.ndarray, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """`rows`' ids as one (B, longest + 1 rounded up to `multiple`) int64 array padded with PAD_ID,
        and their lengths: one gather from the flat ids, no Python loop over examples."""
        lengths = self.lengths[rows].astype(np.int64)  # (B,)
        columns = np.arange(-(-(int(lengths.max()) + 1) // multiple) * multiple)
        inside = columns[None, :] < lengths[:, None]  # (B, L + 1)
        out = np.full(inside.shape, PAD_ID, dtype=np.int64)
        out[inside] = self.ids[(self.offsets[rows][:, None] + columns[None, :])[inside]]
        return out, lengths


class EncodedSplit:
    """The encoded examples of one split; `split[i]` is (source ids, target ids), without BOS/EOS."""

    def __init__(self, src: _Side, tgt: _Side, texts: tuple[list[str], list[str]] | Path | None = None) -> None:
        if len(src.lengths) != len(tgt.lengths):
            raise NmtError(f"a split has {len(src.lengths)} source but {len(tgt.lengths)} target examples")
        self._src, self._tgt, self._texts = src, tgt, texts

    @classmethod
    def from_lists(
        cls,
        src: Sequence[Sequence[int]],
        tgt: Sequence[Sequence[int]],
        sources: list[str] | None = None,
        references: list[str] | None = None,
    ) -> EncodedSplit:
        """An in-memory split from id lists (and optionally texts), for tests and small experiments."""
        texts = (list(sources), list(references)) if sources is not None and references is not None else None
        return cls(_Side.from_lists(src), _Side.from_lists(tgt), texts)

    @classmethod
    def load(cls, directory: Path, dtype: np.dtype) -> EncodedSplit:
        texts = directory / TEXTS
        return cls(_Side.load(directory, "src", dtype), _Side.load(directory, "tgt", dtype),
                   texts if texts.is_file() else None)

    def __len__(self) -> int:
        return len(self._src.lengths)

    def batch(self, indices: Sequence[int], pin_memory: bool = False, multiple: int = 1) -> Batch:
        """The examples at `indices` as one `Batch`, equal to `collate([split[i] for i in indices])` but
        vectorised: what the trainer's background thread runs for every batch. `multiple` rounds the
        widths up (more padding, fewer distinct shapes: what a compiled model wants)."""
        rows = np.asarray(indices, dtype=np.int64)
        if not len(rows):
            raise ValueError("cannot collate an empty batch")
        if rows.min() < -len(self) or rows.max() >= len(self):
            raise IndexError(f"an example of {rows.tolist()} is out of range for a split of {len(self)}")
        rows %= len(self)
        return terminated(*self._src.padded(rows, multiple), *self._tgt.padded(rows, multiple), pin_memory=pin_memory)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} out of range for a split of {len(self)}")
        index %= len(self)
        return self._src[index], self._tgt[index]

    @property
    def src_lengths(self) -> np.ndarray:
        return self._src.lengths

    @property
    def tgt_lengths(self) -> np.ndarray:
        return self._tgt.lengths

    def texts(self) -> tuple[list[str], list[str]]:
        """(normalised sources, raw references), kept for valid and test to score detokenised output."""
        if self._texts is None:
            raise NmtError("this split keeps no texts (only valid and test do)")
        if isinstance(self._texts, Path):
            with self._texts.open(encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle]
            self._texts = ([r["src"] for r in rows], [r["ref"] for r in rows])
        return self._texts

    def references(self) -> list[str]:
        return self.texts()[1]


class SplitWriter:
    """Appends encoded examples of one split to its files; `close` writes offsets and lengths."""

    def __init__(self, directory: Path, dtype: np.dtype) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.dtype = directory, dtype
        self._ids = {side: (directory / f"{side}.ids").open("wb") for side in SIDES}
        self._lengths: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}

    def add(self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> None:
        for side, rows in zip(SIDES, (src, tgt), strict=True):
            self._lengths[side].append(np.array([len(r) for r in rows], dtype=np.int32))
            flat = np.fromiter((i for r in rows for i in r), dtype=self.dtype)
            self._ids[side].write(flat.tobytes())

    def close(self) -> dict[str, Any]:
        """Finish the files; returns the split's length statistics for meta.json."""
        stats: dict[str, Any] = {}
        for side in SIDES:
            self._ids[side].close()
            lengths = np.concatenate(self._lengths[side]) if self._lengths[side] else np.zeros(0, np.int32)
            np.save(self.directory / f"{side}.lengths.npy", lengths)
            np.save(self.directory / f"{side}.offsets.npy", offsets_of(lengths))
            stats[side] = length_stats(lengths)
        stats["examples"] = len(lengths)
        return stats


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(N + 1,) int64 start positions of N consecutive examples, with the total at the end."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def length_stats(lengths: np.ndarray) -> dict[str, Any]:
    if not len(lengths):
        return {"tokens": 0, "mean": 0.0, "max": 0, "p50": 0, "p95": 0, "p99": 0}
    p50, p95, p99 = np.percentile(lengths, [50, 95, 99])
    return {
        "tokens": int(lengths.sum()),
        "mean": round(float(lengths.mean()), 2),
        "max": int(lengths.max()),
        "p50": int(p50),
        "p95": int(p95),
        "p99": int(p99),
    }


def tokenizer_files(joint: bool) -> dict[str, str]:
    """File name of each side's tokenizer copy inside the data directory."""
    return {"src": "spm.model", "tgt": "spm.model"} if joint else {"src": "src.model", "tgt": "tgt.model"}


@dataclass
class PreparedData:
    """A directory written by `nmt prepare`: tokenizers, metadata and memory-mapped splits."""

    path: Path
    meta: dict[str, Any]
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    _splits: dict[str, EncodedSplit] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: Path) -> PreparedData:
        path = Path(path)
        meta = read_meta(path)
        info = meta["tokenizer"]
        tokenizers = []
        for side in SIDES:
            model = path / info[side]["file"]
            table = info[side].get("vocabulary")
            tokenizer = Tokenizer.load(model, meta["normalization"],
                                       None if table is None else read_table(path / table))
            if tokenizer.checksum != info[side]["sha256"]:
                raise NmtError(f"{model}: tokenizer does not match the one the data was encoded with "
                               f"(see {path / META})")
            tokenizers.append(tokenizer)
        src, tgt = tokenizers
        return cls(path, meta, src, src if info["joint"] else tgt)

    @property
    def languages(self) -> tuple[str, str] | None:
        """The source and target language codes `nmt prepare` stored, if it knew them."""
        stored = self.meta.get("languages")
        return (stored["src"], stored["tgt"]) if stored else None

    @property
    def joint(self) -> bool:
        return bool(self.meta["tokenizer"]["joint"])

    @property
    def shared_ids(self) -> bool:
        """Whether an id is one piece on both sides: one tokenizer, or one id table (an imported model's shared
        vocabulary, whose two SentencePiece models differ)."""
        src, tgt = self.src_tokenizer, self.tgt_tokenizer
        return self.joint or (src.vocabulary is not None and src.vocabulary == tgt.vocabulary)

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def has_split(self, name: str) -> bool:
        return name in self.meta["splits"]

    def split(self, name: str) -> EncodedSplit:
        if not self.has_split(name):
            raise NmtError(f"{self.path}: no {name!r} split; it has {', '.join(self.splits)}")
        if name not in self._splits:
            self._splits[name] = EncodedSplit.load(self.path / name, np.dtype(self.meta["dtype"]))
        return self._splits[name]


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a prepared directory, with one-line errors for anything else."""
    file = Path(path) / META
    if Path(path).is_file():
        raise NmtError(f"{path}: is a file, not a directory written by `nmt prepare`")
    if not Path(path).is_dir():
        raise NmtError(f"{path}: no such data directory (write one with `nmt prepare`)")
    if not file.is_file():
        raise NmtError(f"{path}: not a prepared data directory (no {META}; write one with `nmt prepare`)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NmtError(f"{file}: damaged metadata ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise NmtError(f"{file}: not nmt data format version {FORMAT_VERSION}; prepare the data again")
    return meta
