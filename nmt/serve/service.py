"""The translation service behind `nmt serve`, without HTTP: models, language pairs, limits, batching.

Each model serves one language pair through its own `BatchQueue` and decoding `Worker`
thread, so the event loop stays free (health checks answer during heavy work) and one busy
model does not hold up another. Work is bounded before it starts: a request's decoding work
(each line's output limit × the search's rows) is capped by `Limits.max_work`, long requests
take turns with short ones in slices of `Limits.slice_work`, and a batch whose clients all
gave up stops at its next decoding step. Every request goes through `Translator.translate_lines`,
so the server translates exactly as `nmt translate` does with the same options. The HTTP
layer (`nmt.serve.app`) only parses requests and shapes responses; `ServeError` carries the
status each refusal deserves.
"""

from __future__ import annotations

import asyncio
import copy
import math
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from nmt.config import MAX_ALPHA, DecodeConfig
from nmt.data import encode_source, pad_sources
from nmt.errors import NmtError
from nmt.io import check_readable
from nmt.precision import Precision
from nmt.search import check_options, max_output_lengths
from nmt.serve.pairs import LANGUAGE_NAMES, Pair
from nmt.serve.queue import BatchQueue, Closed, Expired, Job, Overloaded, Turns, Worker
from nmt.tokenizer import Tokenizer
from nmt.translate import LineResult, Translator

MAX_BEAM = 32  # a request's beam (or nbest) beyond this would hold a worker for everyone else


class ServeError(NmtError):
    """A refused request: its HTTP status, a one-line message and, for 503, when to retry."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Engine(Protocol):
    """What the server needs of a model: `Translator`, or `CT2Translator` over a folder from `nmt export`."""

    decode: DecodeConfig
    batch_tokens: int
    buffer_lines: int
    src_tokenizer: Tokenizer
    precision: Precision
    max_source_tokens: int | None

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
    max_work: int = 200_000  # decoding work of one request: its lines' output limits x beam (413 beyond)
    slice_work: int = 4_096  # a longer request is translated in slices of this much, beside the short ones

    def check(self) -> None:
        numbers = {"max-sentences": self.max_sentences, "max-chars": self.max_chars, "timeout": self.timeout,
                   "max-batch-tokens": self.max_batch_tokens, "max-queue": self.max_queue,
                   "max-work": self.max_work, "slice-work": self.slice_work}
        if bad := [f"--{name} {value}" for name, value in numbers.items() if not 0 < value < math.inf]:
            raise NmtError(f"limits must be positive finite numbers, got {', '.join(bad)}")
        if not 0 <= self.max_wait_ms <= 60_000:  # also refuses nan and inf (with which every request timed out)
            raise NmtError(f"--max-wait-ms must be between 0 and 60000 (a minute), got {self.max_wait_ms}")


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
    """One model with its pair, two queues and their workers; `engine` is None until loaded.

    Requests of at most `slice_work` go to the short queue, longer ones to the long queue, where
    they take turns in slices; the long queue's worker passes the CPU to the short one between
    any two decoding steps (`Turns`), so a short request is translated while a long one runs.
    """

    def __init__(self, path: Path, pair: Pair, limits: Limits) -> None:
        self.path, self.pair, self.limits = path, pair, limits
        self.short, self.long = (BatchQueue(limits.max_batch_tokens, limits.max_wait_ms / 1000, limits.max_queue,
                                            limits.slice_work) for _ in range(2))
        turns = Turns()
        self.workers = [Worker(self.short, self.translate, turns, yields=False, name=f"nmt-worker-{pair}-short"),
                        Worker(self.long, self.translate, turns, yields=True, name=f"nmt-worker-{pair}-long")]
        self.engine: Engine | None = None

    @property
    def queues(self) -> tuple[BatchQueue, BatchQueue]:
        return self.short, self.long

    def load(self, device: str, precision: str) -> None:
        self.engine = load_engine(self.path, device, precision)
        for worker in self.workers:
            worker.start()

    def put(self, job: Job) -> None:
        (self.short if sum(job.work) <= self.limits.slice_work else self.long).put(job)

    def options(self, request: TranslateRequest) -> Hashable:
        """The request's decoding options, complete and checked: the key batches are grouped by.

        `alternatives` asks for that many more hypotheses (LibreTranslate's way), so the
        n-best list grows to hold them, and so does the checkpoint's beam unless the request sets one.
        """
        assert self.engine is not None
        base = self.engine.decode
        nbest = max(request.nbest or 1, request.alternatives + 1)
        beam = request.beam or (base.beam if base.sampling else max(base.beam, nbest))
        bounds = {"beam": MAX_BEAM, "nbest": MAX_BEAM, "alternatives": MAX_BEAM - 1, "alpha": MAX_ALPHA}
        for name, most in bounds.items():
            if (value := getattr(request, name)) is not None and value > most:
                raise ServeError(400, f"{name}: at most {most:g} on this server, got {value}")
        if beam > MAX_BEAM:  # the model's own default
            raise ServeError(400, f"beam: the model's default beam {beam} is beyond this server's limit of "
                                  f"{MAX_BEAM}; ask for a smaller one")
        alpha = base.alpha if request.alpha is None else request.alpha
        try:
            check_options(replace(base, beam=beam, nbest=nbest, alpha=alpha))
        except NmtError as exc:
            raise ServeError(400, str(exc)) from None
        return (("alpha", alpha), ("beam", beam), ("nbest", nbest))

    def decoding(self, options: Hashable) -> DecodeConfig:
        assert self.engine is not None
        return replace(self.engine.decode, **dict(options))  # type: ignore[call-overload]

    def measure(self, lines: Sequence[str], options: Hashable) -> tuple[list[int], list[int]]:
        """Each line's source tokens, and its decoding work: its output limit (the steps the search may take,
        from `max_len_a`, `max_len_b` and the model's positions) × the search's rows (beam, or samples)."""
        assert self.engine is not None
        limit = self.engine.max_source_tokens
        ids = [encode_source(self.engine.src_tokenizer, line)[:limit] for line in lines]
        tokens = [len(one) for one in ids]
        if not ids:
            return tokens, []
        decode = self.decoding(options)
        steps = max_output_lengths(pad_sources(ids)[1], decode, limit).tolist()
        rows = decode.nbest if decode.sampling else decode.beam
        return tokens, [rows * step if count > 1 else 0 for step, count in zip(steps, tokens, strict=True)]

    def translate(self, options: Hashable, lines: list[str], should_stop: Callable[[], bool]) -> list[LineResult]:
        """The worker's call: the whole batch through `translate_lines` at once (one length sort); it stops
        before the next decoding step once `should_stop()` (CTranslate2, which has no step hook: at the end)."""
        assert self.engine is not None
        variant = copy.copy(self.engine)  # shares the model; only the options differ
        variant.decode = self.decoding(options)
        rows = variant.decode.nbest if variant.decode.sampling else variant.decode.beam
        variant.batch_tokens = self.limits.max_batch_tokens * rows
        variant.buffer_lines = max(1, len(lines))
        if isinstance(getattr(variant, "model", None), torch.nn.Module):
            variant.model = SteppedDecoder(variant.model, should_stop)
        return list(variant.translate_lines(lines))


class SteppedDecoder:
    """A model that asks `should_stop()` before each decoding step (where the worker may also let another
    batch take a turn) and raises `Expired` if so: the search, written against the `Decoder` protocol,
    is shared or abandoned between two steps, its results unchanged."""

    def __init__(self, model: torch.nn.Module, should_stop: Callable[[], bool]) -> None:
        self.model, self.should_stop = model, should_stop

    def __getattr__(self, name: str) -> Any:  # encode, init_state, reorder_state, max_positions: the model's own
        return getattr(self.model, name)

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        if self.should_stop():
            raise Expired("every client of the batch stopped waiting")
        return self.model.step(tokens, state)


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
        options = model.options(request)
        tokens, work = model.measure(lines, options)
        if sum(work) > self.limits.max_work:
            raise ServeError(413, f"this request needs up to {sum(work)} decoding steps × beams (its lines' output "
                                  f"limits × beam); the limit is {self.limits.max_work}: send fewer lines or a "
                                  f"smaller beam")
        job = Job(lines, options, tokens, work, deadline=time.monotonic() + self.limits.timeout)
        try:
            model.put(job)
        except Overloaded as exc:
            raise ServeError(503, f"server overloaded: {exc}", retry_after=1) from None
        except Closed as exc:
            raise ServeError(503, str(exc)) from None
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(job.future), self.limits.timeout)
        except (TimeoutError, Expired):  # the worker may see the shared deadline pass before this await does
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
            for queue in model.queues:
                queue.close()

    def abandon(self) -> int:
        """Shutdown, step two (the grace period is over): every unfinished request gets 503."""
        error = ServeError(503, "the server shut down before this request was translated")
        return sum(queue.abandon(error) for model in self.models.values() for queue in model.queues)

    def join(self, timeout: float) -> None:
        for model in self.models.values():
            for worker in model.workers:
                if worker.is_alive():
                    worker.join(timeout)


def split_lines(texts: Sequence[str]) -> tuple[list[int], list[str]]:
    """Each text's line count and every line in order ('a\\nb' is two lines; '' is one, empty)."""
    per_text = [text.split("\n") for text in texts]
    return [len(lines) for lines in per_text], [line for lines in per_text for line in lines]
