"""A bounded pipeline of long-lived threads: read -> [compress] -> write.

The copy engine moves a disk in chunks of a few MiB.  Instead of a future per chunk
(or per run, or per cluster), a fixed handful of threads is started once and fed
through bounded queues:

* :func:`ordered_map` takes jobs from an iterator on a feeder thread (planning runs
  there, beside the I/O), runs ``work(job)`` on ``workers`` threads and yields the
  results in job order, with at most ``ahead`` jobs taken and not yet yielded;
* :class:`BufferPool` hands out at most ``count`` reusable page-aligned buffers, in the
  order they are asked for, so a job never waits for a buffer that a later job holds;
* :class:`TaskQueue` runs tasks (the writes of a chunk, then giving its buffer back) on
  ``threads`` threads with at most ``depth`` queued.

Memory is bounded by the pool; reads, zero scans, compression and writes release the
GIL, so two workers keep both cores busy.  The first error of any stage is raised to
the caller, and closing a stage waits for its threads, so no thread touches a buffer
after the caller has moved on.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from typing import Generic, TypeVar, cast

from qcowlib.core.hostfile import aligned_buffer
from qcowlib.errors import QcowlibError

J = TypeVar("J")
R = TypeVar("R")


class PipelineClosed(QcowlibError):
    """A stage was closed while a thread waited on it (the run was abandoned)."""


class BufferPool:
    """At most ``count`` page-aligned buffers of ``size`` bytes, made on first use."""

    def __init__(self, size: int, count: int) -> None:
        if count < 1:
            raise ValueError("a buffer pool needs at least one buffer")
        self.size = size
        self.count = count
        self._free: list[memoryview] = []
        self._made = 0
        self._closed = False
        self._cv = threading.Condition()

    @property
    def made(self) -> int:
        """Buffers allocated so far (never more than ``count``)."""
        return self._made

    def get(self) -> memoryview:
        """A free buffer; waits for one to be given back when all are in use.

        Raises :class:`PipelineClosed` once the pool is closed.
        """
        with self._cv:
            while True:
                if self._closed:
                    raise PipelineClosed("buffer pool closed")
                if self._free:
                    return self._free.pop()
                if self._made < self.count:
                    self._made += 1
                    break
                self._cv.wait()
        return aligned_buffer(self.size)

    def put(self, buf: memoryview) -> None:
        """Give a buffer back."""
        with self._cv:
            self._free.append(buf)
            self._cv.notify()

    def close(self) -> None:
        """Wake every waiter with :class:`PipelineClosed`; drop the free buffers."""
        with self._cv:
            self._closed = True
            self._free.clear()
            self._cv.notify_all()


class _Ordered(Generic[J, R]):
    def __init__(
        self,
        jobs: Iterable[J],
        work: Callable[[J], R],
        workers: int,
        ahead: int,
        on_close: Callable[[], None] | None,
        name: str,
    ) -> None:
        self.work = work
        self.on_close = on_close
        self.cv = threading.Condition()
        self.done: dict[int, tuple[bool, R | BaseException]] = {}
        self.total: int | None = None
        self.closed = False
        self.todo: queue.SimpleQueue[tuple[int, J] | None] = queue.SimpleQueue()
        self.slots = threading.Semaphore(ahead)
        self.workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        self.feeder = threading.Thread(
            target=self._feed, args=(jobs,), name=f"{name}-feed", daemon=True
        )
        for t in self.workers:
            t.start()
        self.feeder.start()

    def _feed(self, jobs: Iterable[J]) -> None:
        seq = 0
        try:
            for job in jobs:
                self.slots.acquire()
                if self.closed:
                    return
                self.todo.put((seq, job))
                seq += 1
        except BaseException as exc:  # handed to the consumer at this point of the order
            with self.cv:
                self.done[seq] = (False, exc)
                seq += 1
        finally:
            with self.cv:
                self.total = seq
                self.cv.notify_all()
            for _ in self.workers:
                self.todo.put(None)

    def _work(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            seq, job = item
            outcome: tuple[bool, R | BaseException]
            if self.closed:
                outcome = (False, PipelineClosed("pipeline closed"))
            else:
                try:
                    outcome = (True, self.work(job))
                except BaseException as exc:
                    outcome = (False, exc)
            with self.cv:
                self.done[seq] = outcome
                self.cv.notify_all()

    def results(self) -> Generator[R, None, None]:
        seq = 0
        try:
            while True:
                with self.cv:
                    while seq not in self.done and (self.total is None or seq < self.total):
                        self.cv.wait()
                    if seq not in self.done:
                        return
                    ok, value = self.done.pop(seq)
                self.slots.release()
                seq += 1
                if not ok:
                    raise cast(BaseException, value)
                yield cast(R, value)
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                self.on_close()
            for _ in range(len(self.workers) + 1):
                self.slots.release()  # a feeder waiting for a slot sees ``closed``
        self.feeder.join()
        for t in self.workers:
            t.join()


def ordered_map(
    jobs: Iterable[J],
    work: Callable[[J], R],
    *,
    workers: int = 2,
    ahead: int = 4,
    on_close: Callable[[], None] | None = None,
    name: str = "qcowlib-pipe",
) -> Generator[R, None, None]:
    """``work(job)`` for every job, on ``workers`` threads, results in job order.

    ``jobs`` is iterated on a feeder thread; at most ``ahead`` jobs are taken and not
    yet yielded.  An exception from ``jobs`` or ``work`` is raised where its result
    would have been yielded.  Closing the returned iterator (or leaving it early) calls
    ``on_close`` (to wake a feeder waiting in ``jobs``, e.g. :meth:`BufferPool.close`)
    and waits for every thread to finish.
    """
    return _Ordered(jobs, work, workers, ahead, on_close, name).results()


class TaskQueue:
    """``threads`` long-lived threads running submitted tasks, at most ``depth`` queued.

    Use as a context manager: leaving it waits for the queued tasks (after an error,
    skipping those not started, but still running their ``done`` callbacks).  The first
    error a task raises is raised by the next :meth:`submit` or by :meth:`join`.

    The caller's thread may be interrupted anywhere (Ctrl-C, or a signal that the
    command line turns into an exception): so that :meth:`join` and :meth:`close`
    still end, the only state it changes is the list of queued tasks, one append under
    the lock; what is running is counted by the threads that run it.
    """

    def __init__(self, threads: int = 2, depth: int = 4, name: str = "qcowlib-write") -> None:
        self._items: deque[tuple[Callable[[], None], Callable[[], None] | None]] = deque()
        self._depth = depth
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._running = 0
        self._stopping = False
        #: Set when the body of the ``with`` block raised (an error, Ctrl-C, a signal):
        #: tasks not started yet are skipped, their ``done`` callbacks still run.
        self._abandoned = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()
        self._stopped = False

    def _take(self) -> tuple[Callable[[], None], Callable[[], None] | None] | None:
        with self._cv:
            while not self._items and not self._stopping:
                self._cv.wait()
            if not self._items:
                return None
            self._running += 1
            self._cv.notify_all()  # room for a waiting submit
            return self._items.popleft()

    def _run(self) -> None:
        while (item := self._take()) is not None:
            task, done = item
            try:
                if self._error is None and not self._abandoned:
                    task()
            except BaseException as exc:
                with self._cv:
                    if self._error is None:
                        self._error = exc
            finally:
                try:
                    if done is not None:
                        done()
                finally:
                    with self._cv:
                        self._running -= 1
                        self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, task: Callable[[], None], done: Callable[[], None] | None = None) -> None:
        """Queue ``task``, then ``done``; waits while ``depth`` tasks are queued.

        ``done`` runs after ``task`` even when it fails or is skipped after an earlier
        error (it gives buffers back, so nothing waits for them forever).
        """
        self._raise()
        with self._cv:
            while len(self._items) >= self._depth:
                self._cv.wait()
            self._items.append((task, done))
            self._cv.notify_all()

    def join(self) -> None:
        """Wait until every submitted task has run; raise the first error."""
        with self._cv:
            self._cv.notify_all()  # in case a submit was interrupted before it woke them
            while self._items or self._running:
                self._cv.wait()
        self._raise()

    def close(self) -> None:
        """Wait for the queued tasks and stop the threads."""
        if self._stopped:
            return
        self._stopped = True
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def __enter__(self) -> TaskQueue:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            self._abandoned = True
        self.close()
