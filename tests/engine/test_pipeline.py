"""The bounded pipeline: results in order, bounded work in flight, errors and early
exits handled without leaving threads or buffers behind."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.core.pipeline import BufferPool, PipelineClosed, TaskQueue, ordered_map


class Tracker:
    """Counts jobs taken from the feeder and results handed out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.taken = 0
        self.yielded = 0
        self.most_in_flight = 0

    def jobs(self, n: int) -> Iterator[int]:
        for i in range(n):
            with self.lock:
                self.taken += 1
                self.most_in_flight = max(self.most_in_flight, self.taken - self.yielded)
            yield i


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


@settings(max_examples=40, deadline=None)
@given(
    delays=st.lists(st.integers(0, 3), max_size=40),
    workers=st.integers(1, 4),
    ahead=st.integers(1, 6),
)
def test_results_come_in_job_order_with_bounded_work_in_flight(
    delays: list[int], workers: int, ahead: int
) -> None:
    tracker = Tracker()

    def work(i: int) -> int:
        time.sleep(delays[i] / 2000)
        return i * i

    out = []
    for r in ordered_map(
        tracker.jobs(len(delays)), work, workers=workers, ahead=ahead, name="t-order"
    ):
        with tracker.lock:
            tracker.yielded += 1
        out.append(r)
    assert out == [i * i for i in range(len(delays))]
    # A job is held by the feeder while it waits for a slot: at most one more.
    assert tracker.most_in_flight <= ahead + 1
    assert not _threads("t-order")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), bad=st.data(), in_feeder=st.booleans())
def test_an_error_is_raised_where_its_result_would_come(
    n: int, bad: st.DataObject, in_feeder: bool
) -> None:
    k = bad.draw(st.integers(0, n - 1))

    def jobs() -> Iterator[int]:
        for i in range(n):
            if in_feeder and i == k:
                raise OSError("planning failed")
            yield i

    def work(i: int) -> int:
        if not in_feeder and i == k:
            raise ValueError("read failed")
        return i

    got = []
    with pytest.raises(OSError if in_feeder else ValueError):
        for r in ordered_map(jobs(), work, workers=2, ahead=3, name="t-error"):
            got.append(r)
    assert got == list(range(k))
    assert not _threads("t-error")


def test_leaving_early_stops_every_thread_and_wakes_a_waiting_feeder() -> None:
    pool = BufferPool(4096, 2)
    closed = []

    def jobs() -> Iterator[memoryview]:
        while True:
            yield pool.get()  # blocks once both buffers are out: nobody gives them back

    def on_close() -> None:
        closed.append(True)
        pool.close()

    results = ordered_map(jobs(), len, workers=2, ahead=4, on_close=on_close, name="t-early")
    assert next(results) == 4096
    results.close()
    assert closed == [True]
    assert not _threads("t-early")
    assert pool.made == 2


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 4), rounds=st.integers(1, 30))
def test_buffer_pool_never_makes_more_than_its_count(count: int, rounds: int) -> None:
    pool = BufferPool(8192, count)
    held: list[memoryview] = []
    for i in range(rounds):
        if len(held) < count and i % 3:
            held.append(pool.get())
        elif held:
            pool.put(held.pop())
        assert pool.made <= count
    for buf in held:
        assert len(buf) == 8192
        pool.put(buf)
    again = [pool.get() for _ in range(count)]
    assert pool.made <= count
    for buf in again:
        pool.put(buf)


def test_buffer_pool_waits_for_a_buffer_and_refuses_once_closed() -> None:
    pool = BufferPool(4096, 1)
    first = pool.get()
    got: list[memoryview] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get()))
    waiter.start()
    time.sleep(0.05)
    assert not got  # waiting: the only buffer is out
    pool.put(first)
    waiter.join(5)
    assert got and got[0] is first
    pool.close()
    with pytest.raises(PipelineClosed):
        pool.get()


def test_buffers_are_page_aligned() -> None:
    import ctypes

    pool = BufferPool(1 << 20, 2)
    for _ in range(2):
        buf = pool.get()
        assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 4096 == 0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 30), fail=st.one_of(st.none(), st.integers(0, 29)))
def test_task_queue_runs_every_done_callback_and_raises_the_first_error(
    n: int, fail: int | None
) -> None:
    ran: list[int] = []
    done: list[int] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        if i == fail:
            raise OSError(f"task {i} failed")
        with lock:
            ran.append(i)

    failing = fail is not None and fail < n
    submitted = 0
    with TaskQueue(2, 2, name="t-tasks") as tasks:
        try:
            for i in range(n):
                tasks.submit(functools.partial(task, i), functools.partial(done.append, i))
                submitted += 1
            tasks.join()
        except OSError as exc:
            assert failing
            assert str(exc) == f"task {fail} failed"
        else:
            assert not failing
    if not failing:
        assert sorted(ran) == list(range(n))
    # Every buffer is given back, even for tasks skipped after the error.
    assert sorted(done) == list(range(submitted))
    assert not _threads("t-tasks")


def test_a_signal_while_submit_waits_for_room_leaves_join_able_to_finish() -> None:
    """SIGINT/SIGTERM landing in :meth:`TaskQueue.submit` while it waited for room (a
    slow disk: the writers behind) left a task counted that was never queued: the clean-up's
    ``join`` then waited forever (a ``convert`` signalled at the wrong moment hung with
    its temporary output).  A task is counted only by the thread that runs it."""
    import signal

    release = threading.Event()
    ran: list[int] = []
    main = threading.get_ident()
    with TaskQueue(1, 1, name="t-signal") as tasks:

        def first() -> None:
            release.wait(10)
            ran.append(0)

        tasks.submit(first)  # running
        tasks.submit(lambda: ran.append(1))  # queued: the queue is full
        kill = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
        kill.start()
        with pytest.raises(KeyboardInterrupt):
            tasks.submit(lambda: ran.append(2))  # waits for room; the signal lands
        kill.join()
        release.set()
        joined = threading.Thread(target=tasks.join, daemon=True)
        joined.start()
        joined.join(10)
        assert not joined.is_alive(), "join waits for a task that was never queued"
    assert ran == [0, 1]
    assert not _threads("t-signal")
