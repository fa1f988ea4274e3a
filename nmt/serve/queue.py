"""Dynamic batching with fair turns: requests that arrive together are translated together,
and a long request is cut into slices so that short ones never wait behind all of it.

Many small requests cost little more than one when searched in one length-sorted batch
(the matrix products get taller, not more numerous). `BatchQueue` holds waiting jobs; a
`Worker` thread per model takes the oldest job and every later job with the same decoding
options, up to `max_tokens` source tokens, once the batch is full or the oldest job has
waited `max_wait` seconds. It waits only while requests overlap (the last batch held several
jobs, or others were waiting when it ended; before the first batch it assumes so): a lone
client is served at once, and the wait is spent only where company is likely.

Each job gives a batch at most `max_slice` of its work (its first line always): the rest of
it goes back to the end of the queue once that batch is done, so jobs take turns (round
robin) and a short request waits for one slice, not for a whole document at beam 32. A job
whose client gave up (its future cancelled or settled, or its deadline passed) is dropped
before its next slice, and a batch whose every client gave up stops at the next decoding
step (the worker's `should_stop`). The queue never runs a line twice and never mixes
options, and it refuses new jobs beyond `max_queue` (overload) or after `close` (shutdown).
Nothing here knows HTTP: the server waits on each job's future.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """The queue holds `max_queue` jobs: the client should retry later."""


class Closed(Exception):
    """The queue is shutting down: it takes no new jobs and may abandon the waiting ones."""


class Expired(Exception):
    """The job's client stopped waiting (its deadline passed): its remaining lines are not translated."""


@dataclass(eq=False)
class Job:
    """One request's lines with their decoding options; `future` receives one result per line.

    `tokens` and `work` hold one number per line: its source tokens (what `max_tokens`
    counts) and its decoding work (what `max_slice` counts; the tokens when not given).
    """

    lines: Sequence[str]
    options: Hashable  # jobs are batched only with jobs whose options are equal
    tokens: Sequence[int]
    work: Sequence[int] = ()
    deadline: float = math.inf  # time.monotonic() after which nobody waits for the result
    arrived: float = field(default_factory=time.monotonic)
    future: Future[list[Any]] = field(default_factory=Future)
    taken: int = 0  # lines handed to the worker so far
    results: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.lines) or (self.work and len(self.work) != len(self.lines)):
            raise ValueError(f"one token count and one work figure per line, for {len(self.lines)} lines")
        self.work = self.work or self.tokens

    def gave_up(self) -> bool:
        """True once nobody waits for this job: settled (abandoned, cancelled) or past its deadline."""
        return self.future.done() or time.monotonic() >= self.deadline

    def pending_tokens(self) -> int:
        return sum(self.tokens[self.taken:])

    def slice_end(self, room: int, max_work: float, first: bool) -> int:
        """Where this job's next slice ends: lines within `room` tokens and `max_work` work (one line at least
        when the slice opens the batch)."""
        stop, tokens, work = self.taken, 0, 0
        while stop < len(self.lines):
            tokens, work = tokens + self.tokens[stop], work + self.work[stop]
            if (tokens > room or work > max_work) and not (first and stop == self.taken):
                break
            stop += 1
        return stop


@dataclass(frozen=True)
class Slice:
    """Lines `start:stop` of a job, translated in one batch."""

    job: Job
    start: int
    stop: int

    @property
    def lines(self) -> Sequence[str]:
        return self.job.lines[self.start:self.stop]


class BatchQueue:
    """Thread-safe queue of jobs, taken as batches of slices with equal options, in turn."""

    def __init__(self, max_tokens: int, max_wait: float, max_queue: int, max_slice: float = math.inf) -> None:
        if max_tokens < 1 or not 0 <= max_wait < math.inf or max_queue < 1 or not max_slice >= 1:
            raise ValueError(f"max_tokens, max_queue and max_slice must be positive and max_wait finite and >= 0, "
                             f"got {max_tokens}, {max_queue}, {max_slice} and {max_wait}")
        self.max_tokens, self.max_wait, self.max_queue, self.max_slice = max_tokens, max_wait, max_queue, max_slice
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._closed = False
        self._overlapping = True  # the last batch held several jobs or ended with jobs waiting
        self._changed = threading.Condition()

    def put(self, job: Job) -> None:
        """Queue a job, or raise `Overloaded` / `Closed` at once (never blocks)."""
        with self._changed:
            if self._closed:
                raise Closed("the server is shutting down")
            for gone in [j for j in self._waiting if j.gave_up()]:  # clients that gave up free their places
                self._drop(gone)
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._changed.notify_all()

    def next_batch(self) -> list[Slice] | None:
        """Block until a batch is due and return it (its jobs marked running); None once closed and empty."""
        with self._changed:
            while True:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if not self._waiting:
                    return None
                first = self._waiting[0]
                due = first.arrived + (self.max_wait if self._overlapping else 0.0)
                while not self._closed and self._tokens_like(first) < self.max_tokens and time.monotonic() < due:
                    self._changed.wait(max(0.0, due - time.monotonic()))
                if batch := self._take(first.options):
                    self._running.extend(piece.job for piece in batch)
                    return batch

    def done(self, batch: Sequence[Slice]) -> None:
        """The worker finished `batch`; a job with lines left waits for its next turn at the end of the queue."""
        with self._changed:
            jobs = [piece.job for piece in batch]
            self._running = [job for job in self._running if job not in jobs]
            self._overlapping = len(batch) > 1 or bool(self._waiting)
            for job in jobs:
                if job.taken < len(job.lines) and not job.future.done():
                    self._waiting.append(job)
                    if job.gave_up():
                        self._drop(job)
            self._changed.notify_all()

    def close(self) -> None:
        """Take no new jobs; the workers still run those waiting, then `next_batch` returns None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def abandon(self, error: Exception) -> int:
        """Fail every waiting and running job with `error` (shutdown's deadline); returns how many."""
        with self._changed:
            jobs, self._waiting = self._waiting + self._running, []
            self._changed.notify_all()
        return sum(settle(job.future, error=error) for job in jobs)

    def __len__(self) -> int:
        with self._changed:
            return len(self._waiting)

    def _tokens_like(self, first: Job) -> int:
        return sum(job.pending_tokens() for job in self._waiting if job.options == first.options)

    def _drop(self, job: Job) -> None:
        self._waiting.remove(job)
        settle(job.future, error=Expired("the client stopped waiting"))

    def _take(self, options: Hashable) -> list[Slice]:
        """Slices of jobs with `options`, in queue order, up to `max_tokens` (the first always); jobs whose
        clients gave up are dropped, and a job that does not fit ends the batch (none overtakes another)."""
        batch: list[Slice] = []
        room = self.max_tokens
        for job in [j for j in self._waiting if j.options == options]:
            if job.gave_up():
                self._drop(job)
                continue
            stop = job.slice_end(room, self.max_slice, first=not batch)
            if stop == job.taken and job.lines:
                break
            self._waiting.remove(job)
            if job.future.running() or job.future.set_running_or_notify_cancel():  # False: cancelled just now
                batch.append(Slice(job, job.taken, stop))
                room -= sum(job.tokens[job.taken:stop])
                job.taken = stop
        return batch


def settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> bool:
    """Set a future's outcome unless it already has one (abandoned at shutdown, or cancelled)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True


class Turns:
    """The CPU, shared by the decoding threads of one model: one runs at a time.

    A worker holds the turn while it runs a batch. The long requests' worker passes it between
    two decoding steps whenever the other waits (`pass_turn`): alone, a long batch runs as fast
    as before; beside short requests, it gets the CPU between their batches, one step at a time,
    so a short request waits for one step of a long one, never for all of it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._owner: int | None = None
        self._queue: list[int] = []  # threads waiting for the turn, in order

    def __enter__(self) -> Turns:
        me = threading.get_ident()
        with self._changed:
            self._queue.append(me)
            while self._owner is not None or self._queue[0] != me:
                self._changed.wait()
            self._queue.pop(0)
            self._owner = me
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._owner = None
            self._changed.notify_all()

    def waiting(self) -> bool:
        return bool(self._queue)  # read without the lock: a waiter seen late waits one more step

    def pass_turn(self) -> None:
        """Let the waiting thread take a turn, then wait for ours (only the owner calls this)."""
        if self.waiting():
            self.__exit__()
            self.__enter__()


Translate = Callable[[Hashable, list[str], Callable[[], bool]], Sequence[Any]]


class Worker(threading.Thread):
    """Takes batches from a queue and runs them through `translate(options, lines, should_stop)` off the event loop.

    `translate` returns one result per line; each job collects its slices' results in order and
    hears of them once its last slice is done. `should_stop()` is true once every client of the
    batch gave up: `translate` may then stop early by raising. An exception fails that batch's jobs only.
    Workers of one model share `turns`: a batch runs while it holds the turn, and a worker that
    `yields` passes it whenever `translate` asks `should_stop()` (between two decoding steps).
    """

    def __init__(self, queue: BatchQueue, translate: Translate, turns: Turns | None = None, yields: bool = False,
                 name: str = "nmt-worker") -> None:
        super().__init__(name=name, daemon=True)
        self.queue, self.translate, self.turns, self.yields = queue, translate, turns or Turns(), yields

    def run(self) -> None:
        while (batch := self.queue.next_batch()) is not None:
            self.run_batch(batch)

    def run_batch(self, batch: Sequence[Slice]) -> None:
        lines = [line for piece in batch for line in piece.lines]

        def should_stop() -> bool:  # between two decoding steps: a yielding worker lets the other take a turn
            if self.yields:
                self.turns.pass_turn()
            return all(piece.job.gave_up() for piece in batch)

        try:
            with self.turns:
                results = self.translate(batch[0].job.options, lines, should_stop)
            if len(results) != len(lines):
                raise RuntimeError(f"{len(results)} results for {len(lines)} lines")
        except Exception as exc:  # every job of the batch must hear of it
            for piece in batch:
                settle(piece.job.future, error=exc)
        else:
            start = 0
            for piece in batch:
                piece.job.results.extend(results[start:start + len(piece.lines)])
                start += len(piece.lines)
                if piece.stop == len(piece.job.lines):
                    settle(piece.job.future, piece.job.results)
        finally:
            self.queue.done(batch)
