"""Dynamic batching: requests that arrive within a few milliseconds are translated together.

Many small requests cost little more than one when searched in one length-sorted batch
(the matrix products get taller, not more numerous). `BatchQueue` holds waiting jobs; a
`Worker` thread per model takes the oldest job and every later job with the same decoding
options, up to `max_tokens` source tokens, once the batch is full or the oldest job has
waited `max_wait` seconds. It waits only while requests overlap (the last batch held several
jobs, or others were waiting when it ended; before the first batch it assumes so): a lone
client is served at once, and the wait is spent only where company is likely. The queue
never runs a job twice and never mixes options, and it refuses new jobs beyond `max_queue`
(overload) or after `close` (shutdown). Nothing here knows HTTP: the server waits on each
job's future.
"""

from __future__ import annotations

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


@dataclass(eq=False)
class Job:
    """One request's lines with their decoding options; `future` receives one result per line."""

    lines: Sequence[str]
    options: Hashable  # jobs are batched only with jobs whose options are equal
    tokens: int  # source tokens, what `max_tokens` counts
    arrived: float = field(default_factory=time.monotonic)
    future: Future[list[Any]] = field(default_factory=Future)


class BatchQueue:
    """Thread-safe queue of jobs, taken as batches of equal options in arrival order."""

    def __init__(self, max_tokens: int, max_wait: float, max_queue: int) -> None:
        if max_tokens < 1 or max_wait < 0 or max_queue < 1:
            raise ValueError(f"max_tokens and max_queue must be positive and max_wait >= 0, "
                             f"got {max_tokens}, {max_wait} and {max_queue}")
        self.max_tokens, self.max_wait, self.max_queue = max_tokens, max_wait, max_queue
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
            self._waiting = [j for j in self._waiting if not j.future.cancelled()]  # clients that gave up
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._changed.notify_all()

    def next_batch(self) -> list[Job] | None:
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
                    self._running.extend(batch)
                    return batch

    def done(self, batch: Sequence[Job]) -> None:
        """The worker finished `batch` (its futures are set); whether requests overlap decides the next wait."""
        with self._changed:
            self._running = [job for job in self._running if job not in batch]
            self._overlapping = len(batch) > 1 or bool(self._waiting)

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
        return sum(job.tokens for job in self._waiting if job.options == first.options)

    def _take(self, options: Hashable) -> list[Job]:
        """Jobs with `options` in arrival order up to `max_tokens` (the first always); cancelled ones dropped."""
        batch: list[Job] = []
        tokens = 0
        for job in list(self._waiting):
            if job.options != options:
                continue
            if batch and tokens + job.tokens > self.max_tokens:
                break
            self._waiting.remove(job)
            if job.future.set_running_or_notify_cancel():  # False: its client gave up (timeout)
                batch.append(job)
                tokens += job.tokens
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


class Worker(threading.Thread):
    """Takes batches from a queue and runs them through `translate(options, lines)` off the event loop.

    `translate` returns one result per line; each job gets its own slice, in its own order.
    An exception fails the jobs of that batch only.
    """

    def __init__(self, queue: BatchQueue, translate: Callable[[Hashable, list[str]], Sequence[Any]],
                 name: str = "nmt-worker") -> None:
        super().__init__(name=name, daemon=True)
        self.queue, self.translate = queue, translate

    def run(self) -> None:
        while (batch := self.queue.next_batch()) is not None:
            self.run_batch(batch)

    def run_batch(self, batch: Sequence[Job]) -> None:
        lines = [line for job in batch for line in job.lines]
        try:
            results = self.translate(batch[0].options, lines)
            if len(results) != len(lines):
                raise RuntimeError(f"{len(results)} results for {len(lines)} lines")
        except Exception as exc:  # every job of the batch must hear of it
            for job in batch:
                settle(job.future, error=exc)
        else:
            start = 0
            for job in batch:
                settle(job.future, list(results[start:start + len(job.lines)]))
                start += len(job.lines)
        finally:
            self.queue.done(batch)
