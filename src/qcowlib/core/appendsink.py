"""Sequential output through aligned staging buffers, written by writer threads.

Compressed grains and clusters are small byte strings at arbitrary offsets; written as
they come they go through the page cache (and on this kind of VM most of such a
convert's kernel time went into allocating it).  :class:`AppendWriter` copies them
back to back into page-aligned buffers of :data:`STAGE` bytes and hands each full
buffer, which ends on a :data:`STAGE` boundary of the file, to a writer thread, so all
but the first and the last write are whole aligned pages that
:class:`qcowlib.core.hostfile.DataWriter` sends straight to the disk.
"""

from __future__ import annotations

from collections.abc import Callable

from qcowlib.core.hostfile import WRITE_MAX, DataWriter
from qcowlib.core.pipeline import BufferPool, TaskQueue

#: Bytes per staging buffer (and per write call).
STAGE = WRITE_MAX


class AppendWriter:
    """Writes appended bytes from file offset ``start`` on, in order, through ``tasks``.

    At most ``buffers`` staging buffers are in use; :meth:`append` waits for one when
    the writers fall behind.  :meth:`close` writes the tail and waits for every write.
    """

    def __init__(self, sink: DataWriter, tasks: TaskQueue, start: int, buffers: int = 6) -> None:
        self.sink = sink
        self.tasks = tasks
        self.pool = BufferPool(STAGE, buffers)
        self.pos = start
        self._buf: memoryview | None = None
        self._buf_start = start
        self._filled = 0

    def _limit(self) -> int:
        """Bytes the current buffer takes: up to the next STAGE boundary of the file."""
        return STAGE - self._buf_start % STAGE

    def append(self, data: bytes | memoryview) -> None:
        """Append ``data`` at the current position."""
        view = memoryview(data).cast("B")
        while view:
            if self._buf is None:
                self._buf = self.pool.get()
                self._buf_start = self.pos
                self._filled = 0
            take = min(len(view), self._limit() - self._filled)
            self._buf[self._filled : self._filled + take] = view[:take]
            self._filled += take
            self.pos += take
            view = view[take:]
            if self._filled == self._limit():
                self._submit()

    def skip_to(self, pos: int) -> None:
        """Move on to ``pos`` (not before the current position); the gap reads zeros."""
        if pos < self.pos:
            raise ValueError("an append writer only moves forward")
        gap = pos - self.pos
        if self._buf is not None and gap <= self._limit() - self._filled:
            self.append(bytes(gap))  # within the buffer: pad it
            return
        self._submit()
        self.pos = pos

    def _submit(self) -> None:
        buf, self._buf = self._buf, None
        if buf is None or self._filled == 0:
            if buf is not None:
                self.pool.put(buf)
            return
        data = buf[: self._filled]
        self.tasks.submit(_write(self.sink, self._buf_start, data), _give(self.pool, buf))

    def close(self) -> int:
        """Write what is staged, wait for all writes; returns the end position."""
        self._submit()
        self.tasks.join()
        self.pool.close()
        return self.pos


def _write(sink: DataWriter, offset: int, data: memoryview) -> Callable[[], None]:
    def write() -> None:
        sink.write(offset, [data])

    return write


def _give(pool: BufferPool, buf: memoryview) -> Callable[[], None]:
    def give() -> None:
        pool.put(buf)

    return give
