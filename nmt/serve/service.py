"""The translation service behind `nmt serve`, without HTTP: models, language pairs, limits, batching.

Each model serves one language pair through its own `BatchQueue` and decoding `Worker`
thread, so the event loop stays free (health checks answer during heavy work) and one busy
model does not hold up another. Every request goes through `Translator.translate_lines`,
so the server translates exactly as `nmt translate` does with the same options. The HTTP
layer (`nmt.serve.app`) only parses requests and shapes responses; `ServeError` carries the
status each refusal deserves.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from nmt.checkpoint import load_checkpoint
from nmt.config import DecodeConfig
from nmt.data import encode_source
from nmt.data.sources import LANGUAGE_CODE
from nmt.errors import NmtError
from nmt.io import check_readable
from nmt.precision import Precision
from nmt.search import check_options
from nmt.serve.queue import BatchQueue, Closed, Job, Overloaded, Worker
from nmt.tokenizer import Tokenizer
from nmt.translate import LineResult, Translator

MAX_BEAM = 32  # a request's beam (or nbest) beyond this would hold a worker for everyone else
LANGUAGE_NAMES = dict(pair.split(":") for pair in (
    "ar:Arabic bg:Bulgarian ca:Catalan cs:Czech da:Danish de:German el:Greek en:English es:Spanish et:Estonian "
    "fa:Persian fi:Finnish fr:French ga:Irish he:Hebrew hi:Hindi hu:Hungarian id:Indonesian it:Italian ja:Japanese "
    "ko:Korean lt:Lithuanian lv:Latvian nl:Dutch no:Norwegian pl:Polish pt:Portuguese ro:Romanian ru:Russian "
    "sk:Slovak sl:Slovenian sv:Swedish th:Thai tr:Turkish uk:Ukrainian vi:Vietnamese zh:Chinese").split())


class ServeError(NmtError):
    """A refused request: its HTTP status, a one-line message and, for 503, when to retry."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass(frozen=True)
class Pair:
    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.source}-{self.target}"


def parse_pair(text: str) -> Pair:
    """'en-de' -> Pair('en', 'de')."""
    parts = text.split("-")
    if len(parts) != 2 or not all(LANGUAGE_CODE.fullmatch(part) for part in parts):
        raise NmtError(f"--pair must look like en-de (source-target language codes), got {text!r}")
    return Pair(parts[0], parts[1])


def stored_pair(path: Path) -> Pair | None:
    """The language codes `nmt prepare` stored, carried by the checkpoint (or the export's nmt.json)."""
    if path.is_dir():
        from nmt.export import ExportedModel  # only the manifest: ctranslate2 is not needed to read it

        languages = ExportedModel(path).languages
    else:
        languages = load_checkpoint(path).languages
    return Pair(*languages) if languages else None


def resolve_pairs(models: Sequence[Path], pairs: Sequence[str],
                  stored: Callable[[Path], Pair | None] = stored_pair) -> list[Pair]:
    """One pair per model: `--pair` in order, else the checkpoint's own codes; each pair served once."""
    if pairs and len(pairs) != len(models):
        raise NmtError(f"give one --pair per --model: {len(models)} model(s), {len(pairs)} pair(s)")
    found = [parse_pair(p) for p in pairs] if pairs else [stored(path) for path in models]
    for path, pair in zip(models, found, strict=True):
        if pair is None:
            raise NmtError(f"{path} stores no language codes; say which pair it serves with --pair src-tgt")
    resolved = [pair for pair in found if pair is not None]
    if len(set(resolved)) != len(resolved):
        raise NmtError(f"each language pair can be served by one model only, got {', '.join(map(str, resolved))}")
    return resolved


class Engine(Protocol):
    """What the server needs of a model: `Translator`, or `CT2Translator` over a folder from `nmt export`."""

    decode: DecodeConfig
    batch_tokens: int
    buffer_lines: int
    src_tokenizer: Tokenizer
    precision: Precision

    def translate_lines(self, lines: Iterable[str], first_line: int = 1) -> Iterator[LineResult]: ...


def check_model(path: Path) -> None:
    """Fail in one line before the server listens: a checkpoint must be a readable file, a folder an export."""
    if path.is_dir():
        from nmt.export import ExportedModel

        ExportedModel(path)
    else:
        check_readable(path)


def load_engine(path: Path, device: str, precision: str) -> Engine:
    """The one place that knows model formats: an nmt checkpoint file, or a folder from `nmt export`.

    CTranslate2 gets as many threads as torch was given (the command sets them for serving).
    """
    if path.is_dir():
        from nmt.engines import CT2Translator  # imports ctranslate2, an optional extra, only when asked for

        return CT2Translator.from_folder(path, device=device, precision=precision, threads=torch.get_num_threads())
    return Translator.from_checkpoint(path, device=device, precision=precision)


def serving_threads(requested: int, models: int) -> int:
    """torch threads for `nmt serve`: as asked, else the cores but one (the HTTP side's) shared by the models.

    Measured on 2 cores: with 2 threads the decoding threads spin-wait on a core the event loop and
    the clients need, and a 90 ms request took 3.3 s; with 1 it took 72-92 ms.
    """
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - 1) // max(models, 1))


@dataclass(frozen=True)
class Limits:
    """What one request may ask and how the queue batches; the defaults suit a small CPU server."""

    max_sentences: int = 128  # lines per request (413 beyond)
    max_chars: int = 20_000  # characters per request (413 beyond)
    max_batch_tokens: int = 4096  # source tokens gathered into one batch (searched as this × beam)
    max_wait_ms: float = 5.0  # how long the oldest request waits for company, while requests overlap
    max_queue: int = 256  # requests waiting per model (503 beyond)
    timeout: float = 30.0  # seconds a request may take, queueing included (504 beyond)

    def check(self) -> None:
        numbers = {"max-sentences": self.max_sentences, "max-chars": self.max_chars, "timeout": self.timeout,
                   "max-batch-tokens": self.max_batch_tokens, "max-queue": self.max_queue}
        if bad := [f"--{name} {value}" for name, value in numbers.items() if not value > 0]:
            raise NmtError(f"limits must be positive, got {', '.join(bad)}")
        if not self.max_wait_ms >= 0:
            raise NmtError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")


@dataclass
class TranslateRequest:
    """One request as the HTTP layer parsed it; a text with newlines is translated line by line."""

    texts: list[str]
    source: str
    target: str
    alternatives: int = 0
    beam: int | None = None
    alpha: float | None = None
    nbest: int | None = None


class ServedModel:
    """One model with its pair, queue and worker; `engine` is None until loaded."""

    def __init__(self, path: Path, pair: Pair, limits: Limits) -> None:
        self.path, self.pair, self.limits = path, pair, limits
        self.queue = BatchQueue(limits.max_batch_tokens, limits.max_wait_ms / 1000, limits.max_queue)
        self.worker = Worker(self.queue, self.translate, name=f"nmt-worker-{pair}")
        self.engine: Engine | None = None

    def load(self, device: str, precision: str) -> None:
        self.engine = load_engine(self.path, device, precision)
        self.worker.start()

    def options(self, request: TranslateRequest) -> Hashable:
        """The request's decoding options, complete and checked: the key batches are grouped by.

        `alternatives` asks for that many more hypotheses (LibreTranslate's way), so the
        n-best list grows to hold them, and so does the checkpoint's beam unless the request sets one.
        """
        assert self.engine is not None
        base = self.engine.decode
        nbest = max(request.nbest or 1, request.alternatives + 1)
        beam = request.beam or (base.beam if base.sampling else max(base.beam, nbest))
        if beam > MAX_BEAM or nbest > MAX_BEAM:
            raise ServeError(400, f"beam and nbest are limited to {MAX_BEAM} on this server")
        alpha = base.alpha if request.alpha is None else request.alpha
        try:
            check_options(replace(base, beam=beam, nbest=nbest, alpha=alpha))
        except NmtError as exc:
            raise ServeError(400, str(exc)) from None
        return (("alpha", alpha), ("beam", beam), ("nbest", nbest))

    def tokens(self, lines: Sequence[str]) -> int:
        assert self.engine is not None
        return sum(len(encode_source(self.engine.src_tokenizer, line)) for line in lines)

    def translate(self, options: Hashable, lines: list[str]) -> list[LineResult]:
        """The worker's call: the whole batch through `translate_lines` at once (one length sort)."""
        assert self.engine is not None
        variant = copy.copy(self.engine)  # shares the model; only the options differ
        variant.decode = replace(self.engine.decode, **dict(options))  # type: ignore[arg-type]
        rows = variant.decode.nbest if variant.decode.sampling else variant.decode.beam
        variant.batch_tokens = self.limits.max_batch_tokens * rows
        variant.buffer_lines = max(1, len(lines))
        return list(variant.translate_lines(lines))


class Service:
    """Every served model, their loading in the background, and the request path through the queues."""

    def __init__(self, models: Sequence[Path], pairs: Sequence[Pair], limits: Limits) -> None:
        limits.check()
        self.limits = limits
        self.models = {pair: ServedModel(path, pair, limits) for path, pair in zip(models, pairs, strict=True)}
        self.ready = threading.Event()
        self.failure: BaseException | None = None

    def load(self, device: str, precision: str,
             done: Callable[[BaseException | None], None] = lambda failure: None) -> threading.Thread:
        """Load every model in a thread (the server answers /health meanwhile); `ready` is set, then `done` called."""

        def run() -> None:
            try:
                for model in self.models.values():
                    model.load(device, precision)
                self.ready.set()
            except BaseException as exc:  # reported by the command once the server stops
                self.failure = exc
            done(self.failure)

        thread = threading.Thread(target=run, name="nmt-load", daemon=True)
        thread.start()
        return thread

    def languages(self) -> list[dict[str, Any]]:
        """LibreTranslate's /languages: every language served, with the targets it translates into."""
        codes = sorted({code for pair in self.models for code in (pair.source, pair.target)})
        return [{"code": code, "name": LANGUAGE_NAMES.get(code, code),
                 "targets": sorted(pair.target for pair in self.models if pair.source == code)} for code in codes]

    async def translate(self, request: TranslateRequest) -> list[list[LineResult]]:
        """Each text's line results, after the limits, through the model's queue, within the timeout."""
        model = self.models.get(Pair(request.source, request.target))
        if model is None:
            served = ", ".join(map(str, self.models))
            raise ServeError(400, f"no model for {request.source}-{request.target}; this server translates {served}")
        if not self.ready.is_set():
            raise ServeError(503, "the model is still loading", retry_after=5)
        line_counts, lines = split_lines(request.texts)
        self._check_size(lines)
        job = Job(lines, model.options(request), model.tokens(lines))
        try:
            model.queue.put(job)
        except Overloaded as exc:
            raise ServeError(503, f"server overloaded: {exc}", retry_after=1) from None
        except Closed as exc:
            raise ServeError(503, str(exc)) from None
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(job.future), self.limits.timeout)
        except TimeoutError:
            raise ServeError(504, f"the translation took longer than the {self.limits.timeout:g} s timeout") from None
        grouped, start = [], 0
        for count in line_counts:
            grouped.append(results[start:start + count])
            start += count
        return grouped

    def _check_size(self, lines: Sequence[str]) -> None:
        chars = sum(len(line) for line in lines)
        if len(lines) > self.limits.max_sentences:
            raise ServeError(413, f"{len(lines)} sentences in one request; the limit is {self.limits.max_sentences}")
        if chars > self.limits.max_chars:
            raise ServeError(413, f"{chars} characters in one request; the limit is {self.limits.max_chars}")

    def drain(self) -> None:
        """Shutdown, step one: refuse new requests (503); the queued ones are still translated."""
        for model in self.models.values():
            model.queue.close()

    def abandon(self) -> int:
        """Shutdown, step two (the grace period is over): every unfinished request gets 503."""
        error = ServeError(503, "the server shut down before this request was translated")
        return sum(model.queue.abandon(error) for model in self.models.values())

    def join(self, timeout: float) -> None:
        for model in self.models.values():
            if model.worker.is_alive():
                model.worker.join(timeout)


def split_lines(texts: Sequence[str]) -> tuple[list[int], list[str]]:
    """Each text's line count and every line in order ('a\\nb' is two lines; '' is one, empty)."""
    per_text = [text.split("\n") for text in texts]
    return [len(lines) for lines in per_text], [line for lines in per_text for line in lines]
