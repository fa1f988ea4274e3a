"""Translator: text in, text out, with one checkpoint file and nothing else.

Inputs are normalised the way the training data was (the checkpoint carries the
tokenizer and its normalisation), sorted by length and packed into token-bounded
batches, searched, detokenised and returned in input order. Output length is
bounded per sentence, so a sentence translates the same alone or in any batch.
"""

from __future__ import annotations

import os
import select
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import nn

from nmt.checkpoint import Checkpoint, load_checkpoint
from nmt.config import DecodeConfig
from nmt.data import encode_source, pad_sources
from nmt.device import autocast, keep_freed_memory, resolve_device, set_threads
from nmt.errors import NmtError
from nmt.io import decode_line
from nmt.models import Seq2Seq, build_model
from nmt.precision import Precision, check_precision, choose_precision, matrix_shapes
from nmt.search import Hypothesis, search

QUANTIZATIONS = ("none", "int8")
DECODE_ROWS = 256  # rows of the matrix products timed for precision="auto": a decoding step's batch x beam


@dataclass
class Translation:
    text: str
    score: float
    tokens: list[int]


def translate_ids(model: Seq2Seq, sources: Sequence[Sequence[int]], decode: DecodeConfig,
                  batch_tokens: int, device: torch.device) -> list[list[Hypothesis]]:
    """Search every source (ids as `encode_source` makes them); results in input order.

    Sources are sorted by length and packed so that (longest source × sentences ×
    beam) stays near `batch_tokens`; order is restored at the end.
    """
    results: list[list[Hypothesis]] = [[] for _ in sources]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
    start = 0
    while start < len(order):
        longest = max(len(sources[order[start]]), 1)
        rows = decode.nbest if decode.sampling else decode.beam  # search rows per sentence
        count = max(1, batch_tokens // (longest * max(rows, 1)))
        chunk = order[start:start + count]
        src, src_mask = pad_sources([sources[i] for i in chunk])
        found = search(model, src.to(device), src_mask.to(device), decode)
        for index, hypotheses in zip(chunk, found):
            results[index] = hypotheses
        start += count
    return results


class Translator:
    """In-process translation of lists of strings with one checkpoint."""

    def __init__(self, checkpoint: Checkpoint, *, decode: DecodeConfig | None = None, device: str = "auto",
                 precision: str = "auto", quantize: str = "none", threads: int = 0, batch_tokens: int = 4096,
                 warn: Callable[[str], None] | None = None) -> None:
        if quantize not in QUANTIZATIONS:
            raise NmtError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
        self.checkpoint = checkpoint
        self.decode = decode or checkpoint.config.decode
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            set_threads(threads)
            keep_freed_memory()
        check_precision(precision, self.device)
        self.batch_tokens = batch_tokens
        self.warn = warn or (lambda message: None)
        model = build_model(checkpoint.config.model)
        model.load_state_dict(checkpoint.model_state)
        model.eval()
        if quantize == "int8":
            if self.device.type != "cpu":
                raise NmtError("--quantize int8 runs on the CPU only")
            with warnings.catch_warnings():  # torch's deprecation notices would greet every run
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        self.model = model.to(self.device)
        self.precision: Precision = (Precision("fp32", "int8 layers, the rest in fp32") if quantize == "int8" and precision == "auto"
                                     else choose_precision(precision, self.device, matrix_shapes(model, DECODE_ROWS)))
        self.amp_dtype = self.precision.dtype
        self.src_tokenizer = checkpoint.src_tokenizer
        self.tgt_tokenizer = checkpoint.tgt_tokenizer
        self.max_source_tokens: int | None = getattr(self.model, "max_positions", None)  # EOS included

    @classmethod
    def load(cls, path: Path, **options: object) -> Translator:
        return cls(load_checkpoint(path), **options)  # type: ignore[arg-type]

    def translate(self, texts: Sequence[str]) -> list[str]:
        """The best translation of each text."""
        return [best[0].text for best in self.translate_nbest(texts)]

    def translate_nbest(self, texts: Sequence[str], first_line: int = 1) -> list[list[Translation]]:
        """`decode.nbest` translations per text, best first; empty texts give one empty translation."""
        sources: list[list[int]] = []
        keep: list[int] = []
        for offset, text in enumerate(texts):
            ids = self._encode(text, first_line + offset)
            if ids is not None:
                keep.append(offset)
                sources.append(ids)
        output: list[list[Translation]] = [[Translation("", 0.0, [])] for _ in texts]
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            found = translate_ids(self.model, sources, self.decode, self.batch_tokens, self.device)
        for offset, hypotheses in zip(keep, found):
            output[offset] = [Translation(one_line(self.tgt_tokenizer.decode(h.tokens)), h.score, h.tokens) for h in hypotheses]
        return output

    def _encode(self, text: str, line: int) -> list[int] | None:
        ids = encode_source(self.src_tokenizer, text)
        if len(ids) <= 1:  # nothing but EOS: an empty line stays empty
            return None
        if self.max_source_tokens is not None and len(ids) > self.max_source_tokens:
            self.warn(f"line {line}: {len(ids)} tokens, truncated to the model's limit of {self.max_source_tokens}")
            ids = ids[: self.max_source_tokens - 1] + ids[-1:]
        return ids


def one_line(text: str) -> str:
    """Byte-fallback pieces can spell line breaks; one input line must stay one output line."""
    return " ".join(text.split())


def read_chunks(stream: IO[bytes], buffer_size: int, errors: str = "strict",
                name: str = "input") -> Iterator[tuple[int, list[str]]]:
    """Yield (first line number, lines) chunks of at most `buffer_size` lines.

    A chunk is also cut whenever no further input is waiting, so an interactive
    session or a pipe that stays open gets each line translated as it arrives,
    while a file or a fast pipe still fills whole chunks for batching.
    """
    chunk: list[str] = []
    first = 1
    for number, (raw, more_waiting) in enumerate(_raw_lines(stream), start=1):
        line = decode_line(raw, number, name, errors, hint="; use --errors replace to continue")
        chunk.append(line.rstrip("\r"))
        if len(chunk) >= buffer_size or not more_waiting:
            yield first, chunk
            first, chunk = number + 1, []
    if chunk:
        yield first, chunk


def _raw_lines(stream: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Lines without their newline, each with whether more input is already waiting."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # an in-memory stream: everything is there
        lines = stream.read().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for index, line in enumerate(lines):
            yield line, index + 1 < len(lines)
        return
    pending = b""
    while True:
        block = os.read(fd, 1 << 16)
        if not block:
            if pending:
                yield pending, False
            return
        lines = (pending + block).split(b"\n")
        pending = lines.pop()  # an incomplete last line waits for the next block
        for index, line in enumerate(lines):
            last = index + 1 == len(lines)
            yield line, not last or bool(select.select([fd], [], [], 0)[0])
