"""Where parallel text comes from: aligned files, TSV/JSONL tables, Hugging Face datasets.

Every source yields raw (source, target) string pairs and knows its size when
it can (for progress bars and for carving valid/test sets out of it). Fields
of JSONL rows and dataset rows are dotted paths, so the common Hugging Face
layout `{"translation": {"en": ..., "de": ...}}` is the field `translation.en`,
and two plain columns are just their names.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from nmt.errors import NmtError
from nmt.io import check_readable, count_lines, read_lines
from nmt.progress import SILENT, Reporter

Pair = tuple[str, str]
TABLE_SUFFIXES = (".tsv", ".jsonl")
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(_[A-Za-z0-9]{2,8})?")  # en, deu, pt_BR, zh_Hant
FILE_LANGUAGE = re.compile(r"[a-z]{2}(_[A-Z]{2})?")  # what a file suffix must look like to be read as one


class PairSource(Protocol):
    def size(self) -> int | None:
        """Number of pairs, or None when unknown until read (streaming)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What meta.json records about where the data came from."""
        ...

    def __iter__(self) -> Iterator[Pair]: ...


def chunked(pairs: Iterator[Pair], size: int) -> Iterator[list[Pair]]:
    while chunk := list(islice(pairs, size)):
        yield chunk


@dataclass
class TextFiles:
    """Two aligned plain-text files (optionally gzipped), one sentence per line."""

    src: Path
    tgt: Path

    def __post_init__(self) -> None:
        self.src, self.tgt = Path(self.src), Path(self.tgt)
        src_lines, tgt_lines = count_lines(self.src), count_lines(self.tgt)
        if src_lines != tgt_lines:
            raise NmtError(
                f"{self.src} has {src_lines:,} lines but {self.tgt} has {tgt_lines:,}: the files are not aligned"
            )
        self._size = src_lines

    def size(self) -> int:
        return self._size

    def describe(self) -> dict[str, Any]:
        return {"kind": "files", "src": str(self.src), "tgt": str(self.tgt)}

    def __iter__(self) -> Iterator[Pair]:
        return zip(read_lines(self.src), read_lines(self.tgt), strict=False)


def language_code(code: str, option: str) -> str:
    """A checked code: ISO 639 letters, a region or script after '_' (not '-': it separates the pair, en-de)."""
    if not LANGUAGE_CODE.fullmatch(code):
        raise NmtError(f"{option} must be a language code such as en, deu or pt_BR, got {code!r}")
    return code


def file_language(path: Path) -> str | None:
    """'train.de' or 'train.de.gz' -> 'de' (the Multi30k, WMT and Moses layout); None for any other name."""
    suffixes = [suffix[1:] for suffix in Path(path).suffixes if suffix != ".gz"]
    return suffixes[-1] if suffixes and FILE_LANGUAGE.fullmatch(suffixes[-1]) else None


def corpus_languages(src_lang: str | None, tgt_lang: str | None, train: PairSource) -> Pair | None:
    """The pair's language codes, stored with the data for `nmt serve`: as given, else the training files' suffixes."""
    if src_lang and tgt_lang:
        return language_code(src_lang, "--src-lang"), language_code(tgt_lang, "--tgt-lang")
    if isinstance(train, TextFiles) and not (src_lang or tgt_lang):
        found = file_language(train.src), file_language(train.tgt)
        if found[0] and found[1] and found[0] != found[1]:
            return found[0], found[1]
    return None


def field_value(row: dict[str, Any], path: str, where: str) -> str:
    """The string at a dotted `path` of a row; None counts as empty, anything else not a string is an error."""
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise NmtError(f"{where}: no field {path!r}")
        value = value[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise NmtError(f"{where}: field {path!r} holds {type(value).__name__}, not text")
    return value


@dataclass
class TableFile:
    """A TSV or JSONL file (optionally gzipped) holding both sides of every pair.

    TSV fields are column names from a header line, or 0-based column numbers
    when the file has no header (the default: columns 0 and 1); JSONL fields are
    dotted paths into each object.
    """

    path: Path
    src_field: str | None = None
    tgt_field: str | None = None

    def __post_init__(self) -> None:
        self.path = check_readable(Path(self.path))
        suffixes = [s for s in self.path.suffixes if s != ".gz"]
        self.kind = suffixes[-1][1:] if suffixes and suffixes[-1] in TABLE_SUFFIXES else ""
        if not self.kind:
            raise NmtError(f"{self.path}: unknown table format; name it .tsv or .jsonl (optionally .gz)")
        if self.src_field is None or self.tgt_field is None:
            if self.kind == "jsonl":
                raise NmtError(f"{self.path}: name the source and target fields to read from this JSONL file")
            self.src_field, self.tgt_field = "0", "1"
        self._header = self.kind == "tsv" and not (self.src_field.isdigit() and self.tgt_field.isdigit())
        if self.kind == "tsv":
            self._columns = self._column_numbers()

    def _column_numbers(self) -> tuple[int, int]:
        if not self._header:
            return int(self.src_field), int(self.tgt_field)
        names = next(read_lines(self.path)).split("\t")
        for name in (self.src_field, self.tgt_field):
            if name not in names:
                raise NmtError(f"{self.path}: no column {name!r} in the header (columns: {', '.join(names)})")
        return names.index(self.src_field), names.index(self.tgt_field)

    def size(self) -> int:
        return count_lines(self.path) - self._header

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "fields": [self.src_field, self.tgt_field]}

    def __iter__(self) -> Iterator[Pair]:
        lines = enumerate(read_lines(self.path), start=1)
        if self._header:
            next(lines)
        parse = self._tsv if self.kind == "tsv" else self._jsonl
        return (parse(number, line) for number, line in lines)

    def _tsv(self, number: int, line: str) -> Pair:
        cells = line.split("\t")
        needed = max(self._columns) + 1
        if len(cells) < needed:
            raise NmtError(f"{self.path}: line {number} has {len(cells)} column(s), expected at least {needed}")
        return cells[self._columns[0]], cells[self._columns[1]]

    def _jsonl(self, number: int, line: str) -> Pair:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NmtError(f"{self.path}: line {number} is not valid JSON ({exc.msg})") from None
        where = f"{self.path}: line {number}"
        if not isinstance(row, dict):
            raise NmtError(f"{where} is not a JSON object")
        return field_value(row, self.src_field, where), field_value(row, self.tgt_field, where)


@dataclass
class HubDataset:
    """A split of a Hugging Face dataset, through `datasets.load_dataset` (hub name or local path).

    With no fields given, a `translation` column is read as `translation.<lang>`
    (the WMT/IWSLT layout), otherwise the columns named by the language codes.
    """

    name: str
    split: str
    config: str | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None
    src_field: str | None = None
    tgt_field: str | None = None
    streaming: bool = False
    data_files: list[str] | None = None
    cache_dir: Path | None = None
    _fields: tuple[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._data = self._load()
        columns = self._data.column_names or list(next(iter(self._data)))
        self._fields = self._resolve_fields(columns)

    def _where(self) -> str:
        config = f", config {self.config!r}" if self.config else ""
        return f"dataset {self.name!r}{config}, split {self.split!r}"

    def _load(self) -> Any:
        import datasets  # slow to import: only when a dataset is asked for

        try:
            return datasets.load_dataset(
                self.name, self.config, split=self.split, streaming=self.streaming,
                data_files=self.data_files, cache_dir=str(self.cache_dir) if self.cache_dir else None,
            )
        except Exception as exc:  # datasets signals a bad name, config or split with many exception types
            lines = str(exc).strip().splitlines()
            raise NmtError(f"cannot load {self._where()}: {lines[0] if lines else type(exc).__name__}") from exc

    def _resolve_fields(self, columns: list[str]) -> tuple[str, str]:
        nested = "translation" in columns
        fields = []
        for given, lang in ((self.src_field, self.src_lang), (self.tgt_field, self.tgt_lang)):
            if given:
                fields.append(given)
            elif not lang:
                raise NmtError(f"{self._where()}: give a language code or a field for each side "
                               f"(fields: {', '.join(columns)})")
            elif nested:
                languages = self._translation_languages()
                if languages is not None and lang not in languages:
                    raise NmtError(f"{self._where()}: no language {lang!r} in its translations "
                                   f"({', '.join(languages)})")
                fields.append(f"translation.{lang}")
            else:
                fields.append(lang)
        for name in fields:
            if name.split(".")[0] not in columns:
                raise NmtError(f"{self._where()}: no field {name!r} (fields: {', '.join(columns)})")
        return fields[0], fields[1]

    def _translation_languages(self) -> list[str] | None:
        feature = (self._data.features or {}).get("translation")
        languages = getattr(feature, "languages", None) or (list(feature) if isinstance(feature, dict) else None)
        return list(languages) if languages else None

    def size(self) -> int | None:
        if not self.streaming:
            return len(self._data)
        split = (self._data.info.splits or {}).get(self.split)
        return split.num_examples if split and split.num_examples else None

    def describe(self) -> dict[str, Any]:
        return {"kind": "huggingface", "name": self.name, "config": self.config, "split": self.split,
                "fields": list(self._fields), "streaming": self.streaming}

    def __iter__(self) -> Iterator[Pair]:
        where = self._where()
        columns = sorted({f.split(".")[0] for f in self._fields})
        for batch in self._data.select_columns(columns).iter(batch_size=1000):
            for i in range(len(batch[columns[0]])):
                row = {c: batch[c][i] for c in columns}
                yield field_value(row, self._fields[0], where), field_value(row, self._fields[1], where)


@dataclass
class PairList:
    """Pairs held in memory: valid/test sets carved out of the training source."""

    pairs: list[Pair]
    origin: dict[str, Any]

    def size(self) -> int:
        return len(self.pairs)

    def describe(self) -> dict[str, Any]:
        return self.origin

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)


@dataclass
class Remainder:
    """A source without the pairs carved out of it (given by position)."""

    source: PairSource
    excluded: frozenset[int]

    def size(self) -> int | None:
        total = self.source.size()
        return None if total is None else total - len(self.excluded)

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "carved_out": len(self.excluded)}

    def __iter__(self) -> Iterator[Pair]:
        return (pair for i, pair in enumerate(self.source) if i not in self.excluded)


def carve(source: PairSource, sizes: dict[str, int], seed: int,
          reporter: Reporter = SILENT) -> tuple[dict[str, PairList], Remainder]:
    """Take seeded random pairs out of `source` for each named split; the rest is training data."""
    total = source.size()
    if total is None:
        raise NmtError("cannot carve valid/test sets out of a source of unknown size (streaming); give them separately")
    wanted = sum(sizes.values())
    if wanted >= total:
        raise NmtError(f"cannot carve {wanted:,} valid/test pairs out of {total:,} training pairs")
    picked = random.Random(seed).sample(range(total), wanted)
    owner: dict[int, str] = {}
    start = 0
    for name, count in sizes.items():
        owner.update((i, name) for i in picked[start : start + count])
        start += count
    carved: dict[str, list[Pair]] = {name: [] for name in sizes}
    advance = reporter.task("carving valid/test out of train", total, "pairs")
    position = 0
    for chunk in chunked(iter(source), 10_000):
        for i, pair in enumerate(chunk, start=position):
            if i in owner:
                carved[owner[i]].append(pair)
        position += len(chunk)
        advance(len(chunk))
    origin = {"kind": "carved", "from": source.describe(), "seed": seed}
    lists = {name: PairList(pairs, {**origin, "size": len(pairs)}) for name, pairs in carved.items()}
    return lists, Remainder(source, frozenset(owner))
