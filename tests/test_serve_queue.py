"""The dynamic batching queue without HTTP: grouping, order, token bound, waiting, overload, shutdown, turns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

import pytest

from nmt.serve.queue import BatchQueue, Closed, Expired, Job, Overloaded, Slice, Turns, Worker


def job(text: str, options: Hashable = "greedy", tokens: int = 1) -> Job:
    return Job([text], options, [tokens])


def texts(batch: list[Slice] | None) -> list[str]:
    assert batch is not None
    return [line for piece in batch for line in piece.lines]


def test_batches_hold_equal_options_in_arrival_order() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0, max_queue=10)
    for text, options in (("a", "greedy"), ("b", "beam"), ("c", "greedy"), ("d", "beam"), ("e", "greedy")):
        queue.put(job(text, options))
    assert texts(queue.next_batch()) == ["a", "c", "e"]  # the oldest job's options first
    assert texts(queue.next_batch()) == ["b", "d"]
    assert len(queue) == 0


def test_max_tokens_bounds_a_batch_but_a_large_job_still_runs_alone() -> None:
    queue = BatchQueue(max_tokens=10, max_wait=0, max_queue=10)
    for text, tokens in (("a", 4), ("b", 4), ("c", 4), ("big", 25), ("d", 1)):
        queue.put(job(text, tokens=tokens))
    assert texts(queue.next_batch()) == ["a", "b"]  # c would make 12 > 10
    assert texts(queue.next_batch()) == ["c"]  # big does not fit beside c, and later jobs never overtake it
    assert texts(queue.next_batch()) == ["big"]
    assert texts(queue.next_batch()) == ["d"]


def taken(queue: BatchQueue) -> list[str]:
    """The next batch's lines, the batch marked done (as the worker does)."""
    batch = queue.next_batch()
    assert batch is not None
    queue.done(batch)
    return texts(batch)


def test_a_lone_job_runs_at_once_but_overlapping_ones_wait_max_wait_for_company() -> None:
    queue = BatchQueue(max_tokens=3, max_wait=0.2, max_queue=10)

    def timed(lines: list[str]) -> float:
        start = time.monotonic()
        assert taken(queue) == lines
        return time.monotonic() - start

    queue.put(job("a"))
    assert 0.19 <= timed(["a"]) < 2  # before any batch, company is assumed: the first job waits
    queue.put(job("b"))
    assert timed(["b"]) < 0.15  # a ran alone with nobody waiting: a lone client is served at once
    queue.put(job("c"))
    queue.put(job("d"))
    assert timed(["c", "d"]) < 0.15  # both were there already; two jobs: requests overlap from now on
    queue.put(job("e"))
    start = time.monotonic()
    batch = queue.next_batch()
    assert texts(batch) == ["e"] and 0.19 <= time.monotonic() - start < 2  # waited for company that never came
    queue.put(job("f"))  # arrives while e runs: still overlapping
    queue.done(batch or [])
    queue.put(job("g"))
    queue.put(job("h"))
    assert timed(["f", "g", "h"]) < 0.15  # full at once: no wait
    queue.put(job("i"))
    assert timed(["i"]) >= 0.19  # f-g-h held three jobs: i waits for company
    queue.put(job("j"))
    assert timed(["j"]) < 0.15  # i ran alone with nobody waiting


def test_a_job_arriving_during_the_wait_joins_the_batch() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0.5, max_queue=10)
    queue.put(job("a"))
    threading.Timer(0.05, queue.put, [job("b")]).start()
    assert texts(queue.next_batch()) == ["a", "b"]


def test_overload_and_cancelled_jobs() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0, max_queue=2)
    first, second = job("a"), job("b")
    queue.put(first)
    queue.put(second)
    with pytest.raises(Overloaded, match="2 requests are waiting"):
        queue.put(job("c"))
    assert first.future.cancel()  # its client gave up (timeout): the slot is free again and it never runs
    queue.put(job("d"))
    assert texts(queue.next_batch()) == ["b", "d"]


def test_close_refuses_new_jobs_runs_the_waiting_ones_then_ends() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=10, max_queue=10)
    queue.put(job("a"))
    queue.close()
    with pytest.raises(Closed):
        queue.put(job("b"))
    start = time.monotonic()
    assert texts(queue.next_batch()) == ["a"]  # no waiting for company once closed
    assert time.monotonic() - start < 1
    assert queue.next_batch() is None


def test_abandon_fails_waiting_and_running_jobs_once() -> None:
    queue = BatchQueue(max_tokens=1, max_wait=0, max_queue=10)
    running, waiting = job("a"), job("b")
    queue.put(running)
    queue.put(waiting)
    assert queue.next_batch() == [Slice(running, 0, 1)]
    assert queue.abandon(Closed("bye")) == 2
    for j in (running, waiting):
        with pytest.raises(Closed, match="bye"):
            j.future.result(timeout=1)
    assert queue.abandon(Closed("again")) == 0


def test_worker_gives_each_job_its_own_results_in_order() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0.2, max_queue=100)
    seen: list[tuple[Hashable, list[str]]] = []

    def translate(options: Hashable, lines: list[str], should_stop: object) -> list[str]:
        seen.append((options, lines))
        return [f"{options}:{line.upper()}" for line in lines]

    jobs = [Job([f"{i}a", f"{i}b"], i % 2, [1, 1]) for i in range(6)]
    for j in jobs:
        queue.put(j)
    worker = Worker(queue, translate)
    worker.start()
    assert [j.future.result(timeout=5) for j in jobs] == [[f"{i % 2}:{i}A", f"{i % 2}:{i}B"] for i in range(6)]
    assert sorted(options for options, _ in seen) == [0, 1]  # two batches, one per option set
    queue.close()
    worker.join(5)
    assert not worker.is_alive()


def test_a_failing_batch_fails_its_own_jobs_only() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0, max_queue=100)

    def translate(options: Hashable, lines: list[str], should_stop: object) -> list[str]:
        if options == "bad":
            raise ValueError("broken model")
        return lines

    bad, good = job("x", "bad"), job("y", "good")
    queue.put(bad)
    queue.put(good)
    worker = Worker(queue, translate)
    worker.start()
    with pytest.raises(ValueError, match="broken model"):
        bad.future.result(timeout=5)
    assert good.future.result(timeout=5) == ["y"]
    queue.close()
    worker.join(5)


def test_a_long_job_takes_turns_in_slices_so_a_short_one_waits_for_one_slice_only() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0, max_queue=10, max_slice=4)
    long = Job([f"l{i}" for i in range(5)], "beam 32", tokens=[1] * 5, work=[2, 2, 2, 2, 9])
    queue.put(long)
    first = queue.next_batch()
    assert texts(first) == ["l0", "l1"]  # work 4: the slice is full
    short = job("s", "beam 5")
    queue.put(short)  # arrives while the first slice runs
    queue.done(first or [])
    assert taken(queue) == ["s"]  # the rest of the long job went to the end of the queue
    assert taken(queue) == ["l2", "l3"]
    assert taken(queue) == ["l4"]  # a line beyond the slice still runs, alone
    assert len(queue) == 0 and long.taken == 5


def test_the_worker_joins_a_jobs_slices_in_order() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0, max_queue=10, max_slice=2)
    long = Job([f"l{i}" for i in range(5)], "o", tokens=[1] * 5)
    calls: list[list[str]] = []

    def translate(options: Hashable, lines: list[str], should_stop: object) -> list[str]:
        calls.append(lines)
        return [line.upper() for line in lines]

    queue.put(long)
    worker = Worker(queue, translate)
    worker.start()
    assert long.future.result(timeout=5) == ["L0", "L1", "L2", "L3", "L4"]
    assert calls == [["l0", "l1"], ["l2", "l3"], ["l4"]]
    queue.close()
    worker.join(5)


def test_a_job_whose_client_gave_up_gets_no_further_slice() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0, max_queue=10, max_slice=1)
    long = Job(["a", "b", "c"], "o", tokens=[1, 1, 1])
    queue.put(long)
    first = queue.next_batch()
    assert texts(first) == ["a"]
    long.deadline = 0.0  # its timeout passed while the slice ran
    queue.done(first or [])
    assert len(queue) == 0
    with pytest.raises(Expired):
        long.future.result(timeout=1)
    waiting = job("w")
    waiting.deadline = 0.0
    queue.put(waiting)
    queue.put(job("x"))
    assert texts(queue.next_batch()) == ["x"]  # the expired one is dropped, not run
    assert isinstance(waiting.future.exception(timeout=1), Expired)


def test_should_stop_once_every_client_of_the_batch_gave_up() -> None:
    queue = BatchQueue(max_tokens=100, max_wait=0, max_queue=10)
    a, b = job("a"), job("b")
    queue.put(a)
    queue.put(b)
    batch = queue.next_batch()
    assert batch is not None
    answers = []

    def translate(options: Hashable, lines: list[str], should_stop: Callable[[], bool]) -> list[str]:
        answers.append(should_stop())
        a.deadline = 0.0
        answers.append(should_stop())  # b still waits
        b.deadline = 0.0
        answers.append(should_stop())
        raise Expired("stopped between two decoding steps")

    Worker(queue, translate).run_batch(batch)
    assert answers == [False, False, True]
    assert all(isinstance(j.future.exception(timeout=1), Expired) for j in (a, b))
    assert len(queue) == 0


def test_a_long_batch_passes_the_turn_between_two_steps_to_a_short_one_that_waits() -> None:
    turns, order = Turns(), []

    def short_batch() -> None:
        with turns:
            order.append("short")

    with turns:  # this thread is the long requests' worker, between two decoding steps
        order.append("long step 1")
        turns.pass_turn()  # nobody waits: it keeps the turn
        short = threading.Thread(target=short_batch)
        short.start()
        deadline = time.monotonic() + 10
        while not turns.waiting() and time.monotonic() < deadline:
            time.sleep(0.001)
        turns.pass_turn()  # the short batch runs now, whole
        order.append("long step 2")
    short.join(10)
    assert order == ["long step 1", "short", "long step 2"]
