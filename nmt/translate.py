"""Translator: text in, text out, with one checkpoint file and nothing else.

`Translator.translate_lines` is the one translation loop: `nmt translate`, `nmt eval -m`,
`nmt attention` and the Python API all go through it. Inputs are normalised the way the
training data was (the checkpoint carries the tokenizer and its normalisation), read
`buffer_lines` at a time, sorted by length and packed into token-bounded batches,
searched, detokenised and yielded in input order. Output length is bounded per sentence,
so a sentence translates the same alone or in any batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmt.checkpoint import Checkpoint, load_checkpoint
from nmt.config import DecodeConfig
from nmt.data import encode_source, pad_sources
from nmt.device import autocast, resolve_device
from nmt.errors import NmtError
from nmt.io import chunks
from nmt.kernels import choose_output_kernel
from nmt.models import Seq2Seq, build_model
from nmt.precision import Precision, Workload, check_precision, choose_precision
from nmt.search import Hypothesis, check_options, search

QUANTIZATIONS = ("none", "int8")
BATCH_TOKENS = 12000  # source tokens x beam per batch (beam 5: 12,000 ran a median 1.12x faster than 6,000; README)
BUFFER_LINES = 2000  # lines read, sorted and batched at a time


@dataclass(frozen=True)
class Translation:
    text: str
    score: float
    tokens: list[int]


EMPTY = Translation("", 0.0, [])


@dataclass
class LineResult:
    """What one input line gave: its translations, best first (one empty for an empty line)."""

    line: int  # 1-based input line number
    text: str  # the input line as read
    hypotheses: list[Translation]
    source_ids: list[int]  # what the model read (EOS included, after truncation); [] for an empty line
    warning: str | None = None  # e.g. the line was truncated to the model's positions

    @property
    def best(self) -> Translation:
        return self.hypotheses[0]


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
        for index, hypotheses in zip(chunk, found, strict=True):
            results[index] = hypotheses
        start += count
    return results


class Translator:
    """In-process translation with one checkpoint; `translate_lines` is the loop everything uses."""

    def __init__(self, checkpoint: Checkpoint, *, decode: DecodeConfig | None = None, device: str = "auto",
                 precision: str = "auto", quantize: str = "none", batch_tokens: int = BATCH_TOKENS,
                 buffer_lines: int = BUFFER_LINES, output_kernel: str = "auto") -> None:
        """`output_kernel`: "auto" times the output layer's products on the CPU in fp32 (nmt.kernels); "default"
        or "onednn" set it."""
        if quantize not in QUANTIZATIONS:
            raise NmtError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if batch_tokens < 1 or buffer_lines < 1:
            raise NmtError(f"batch tokens and buffer lines must be positive, got {batch_tokens} and {buffer_lines}")
        self.checkpoint = checkpoint
        self.decode = decode or checkpoint.config.decode
        check_options(self.decode)  # once, before any input is read
        self.device = resolve_device(device)
        check_precision(precision, self.device)
        self.batch_tokens, self.buffer_lines = batch_tokens, buffer_lines
        config = checkpoint.config.model
        model = build_model(config)
        model.load_state_dict(checkpoint.model_state)
        model.eval()
        if quantize == "int8":
            if self.device.type != "cpu":
                raise NmtError("--quantize int8 runs on the CPU only")
            with warnings.catch_warnings():  # torch's deprecation notices would greet every run
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        self.model = model.to(self.device)
        self.precision: Precision = (Precision("fp32", "int8 layers, the rest in fp32")
                                     if quantize == "int8" and precision == "auto"
                                     else choose_precision(precision, self.device,
                                                           decode_workloads(model, config.src_vocab_size, self.decode),
                                                           f"translate|{config}|{self.decode.beam}"))
        self.amp_dtype = self.precision.dtype
        fp32_cpu = self.device.type == "cpu" and quantize == "none" and self.amp_dtype is None
        self.output_kernel = choose_output_kernel(self.model, output_kernel if fp32_cpu else "default")
        self.src_tokenizer = checkpoint.src_tokenizer
        self.tgt_tokenizer = checkpoint.tgt_tokenizer
        self.max_source_tokens: int | None = getattr(self.model, "max_positions", None)  # EOS included

    @classmethod
    def from_checkpoint(cls, path: Path, *, device: str = "auto", precision: str = "auto", quantize: str = "none",
                        batch_tokens: int = BATCH_TOKENS, buffer_lines: int = BUFFER_LINES,
                        **decode: Any) -> Translator:
        """Load a checkpoint file; `decode` options (beam=..., alpha=...) replace the checkpoint's, None keeps them."""
        checkpoint = load_checkpoint(path)
        known = {f.name for f in fields(DecodeConfig)}
        if unknown := sorted(set(decode) - known):
            raise NmtError(f"unknown decoding option(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        options = replace(checkpoint.config.decode, **{k: v for k, v in decode.items() if v is not None})
        return cls(checkpoint, decode=options, device=device, precision=precision, quantize=quantize,
                   batch_tokens=batch_tokens, buffer_lines=buffer_lines)

    def translate(self, texts: Sequence[str]) -> list[str]:
        """The best translation of each text."""
        return [result.best.text for result in self.translate_lines(texts)]

    def translate_nbest(self, texts: Sequence[str], first_line: int = 1) -> list[list[Translation]]:
        """`decode.nbest` translations per text, best first; empty texts give one empty translation."""
        return [result.hypotheses for result in self.translate_lines(texts, first_line)]

    def translate_lines(self, lines: Iterable[str], first_line: int = 1) -> Iterator[LineResult]:
        """Translate lines as they come, one result per line in input order.

        Lines are taken `buffer_lines` at a time (fewer where a `LineStream` pauses, so an
        interactive user gets each line at once), sorted by length and batched by `batch_tokens`.
        """
        number = first_line
        for chunk in chunks(lines, self.buffer_lines):
            yield from self._translate_chunk(chunk, number)
            number += len(chunk)

    def _translate_chunk(self, texts: list[str], first_line: int) -> list[LineResult]:
        results = [self._prepare(text, first_line + offset) for offset, text in enumerate(texts)]
        todo = [result for result in results if result.source_ids]
        found = self.search_ids([r.source_ids for r in todo])
        for result, hypotheses in zip(todo, found, strict=True):
            result.hypotheses = [Translation(one_line(self.tgt_tokenizer.decode(h.tokens)), h.score, h.tokens)
                                 for h in hypotheses]
        return results

    def search_ids(self, sources: Sequence[Sequence[int]]) -> list[list[Hypothesis]]:
        """Search model-ready sources; results in input order (the one step another engine replaces)."""
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            return translate_ids(self.model, sources, self.decode, self.batch_tokens, self.device)

    def _prepare(self, text: str, line: int) -> LineResult:
        """Encode one line; an empty one stays empty, a too long one is truncated with a warning."""
        ids = encode_source(self.src_tokenizer, text)
        if len(ids) <= 1:  # nothing but EOS
            return LineResult(line, text, [EMPTY], [])
        limit, warning = self.max_source_tokens, None
        if limit is not None and len(ids) > limit:
            warning = f"line {line}: {len(ids)} tokens, truncated to the model's limit of {limit}"
            ids = ids[: limit - 1] + ids[-1:]
        return LineResult(line, text, [], ids, warning)


def one_line(text: str) -> str:
    """Byte-fallback pieces can spell line breaks; one input line must stay one output line."""
    return " ".join(text.split())


def decode_workloads(model: nn.Module, src_vocab_size: int, decode: DecodeConfig) -> dict[str, Workload]:
    """What precision="auto" times for translation: a batch of 8 synthetic sentences and one sentence,
    each searched with the run's options for exactly 12 steps (throughput and latency both count)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    fixed = replace(decode, max_len_a=0.0, max_len_b=12, min_len=12, nbest=1)

    def translating(sentences: int) -> Workload:
        src = torch.randint(4, src_vocab_size, (sentences, 12), generator=generator)
        src, mask = src.to(device), torch.ones(src.shape, dtype=torch.bool, device=device)

        def run(dtype: torch.dtype | None) -> None:
            with torch.inference_mode(), autocast(device, dtype):
                search(model, src, mask, fixed)

        return run

    return {"a batch": translating(8), "one sentence": translating(1)}
