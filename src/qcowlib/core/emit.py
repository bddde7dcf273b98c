"""ONE emitter: a format's output layout -> bytes in file order -> a file or a stream.

Every writer of a new image is an :class:`OutputLayout` (``formats/<fmt>/layout``-like
modules): it says which units of the source to read (from the chain's map), places each
classified chunk's data (:meth:`OutputLayout.place` returns ``(file offset, bytes)``
records, ascending), and builds the metadata once everything is placed
(:meth:`OutputLayout.finish`).  It does no I/O.  This module drives it into a sink:

* a file (:func:`write_file`): one read pass; data records go to writer threads as they
  come (whole pages straight to the disk, :class:`qcowlib.core.hostfile.DataWriter`;
  small records staged into aligned buffers, :class:`qcowlib.core.appendsink.AppendWriter`),
  then the metadata; the caller gives a temporary file
  (:func:`qcowlib.core.sinks.atomic_output`);
* a stream (:class:`LayoutStream`): the same placement run once to fix the exact size
  and the metadata, then again to emit header, tables and data strictly in file order
  (a chunk placed differently the second time means the source changed:
  :class:`SourceChanged`).

The same layout gives the same bytes to both sinks.  Hashers are fed the bytes in file
order: by the stream as it yields them; for a file, from the file just written (a file
layout is known only once all data is placed, and its header comes first), so the chain
is read once either way.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from qcowlib.core.appendsink import AppendWriter
from qcowlib.core.hostfile import DataWriter, aligned_buffer, pwrite_all
from qcowlib.core.pipeline import TaskQueue
from qcowlib.core.plan import Chunk, Classifier
from qcowlib.core.space import preallocate, reserve
from qcowlib.core.zero import nonzero_runs
from qcowlib.errors import QcowlibError, QcowlibIOError, SourceChanged

Progress = Callable[[int, int], None]
Buffer = bytes | memoryview
Record = tuple[int, Buffer]
#: Output pieces; under uWSGI's 1 MiB chunk limit for Glance uploads.
STREAM_CHUNK = 512 * 1024
#: Writer threads of a file sink.
WORKERS = 2
#: Bytes hashed per read when a written file is fed to hashers.
HASH_CHUNK = 8 * 1024 * 1024


class HashSink(Protocol):
    """What the writers feed output bytes to: anything with hashlib's ``update``."""

    def update(self, data: bytes, /) -> None: ...


class OutputLayout(Protocol):
    """A format's writer of new images, without I/O (see the module docstring).

    ``unit`` is the bytes per classified unit (cluster, block, grain); ``data_start``
    the first byte of the data area (records placed are at or after it);
    ``virtual_size`` the guest size (for progress); ``stage`` asks a file sink to copy
    data into aligned staging buffers (small records at unaligned offsets); ``holes``
    asks it to leave all-zero runs of that many bytes inside records unwritten (0:
    write records whole).

    ``ranges()`` are the unit ranges to read (from the chain's map); ``classifier()`` a
    fresh reader of them; ``begin(stream)`` starts placing (again: a stream places
    twice, and keeps all its metadata until the end); ``place(chunk)`` returns a
    chunk's data records, in file order after every earlier one; ``early()`` metadata
    already final (a file sink writes it at once, to bound memory); ``finish()`` the
    rest of the metadata once every chunk is placed; ``size()`` the file's size then;
    ``reserved()`` how many bytes from ``data_start`` a file sink allocates up front.
    """

    unit: int
    data_start: int
    virtual_size: int
    stage: bool
    holes: int

    def ranges(self) -> list[tuple[int, int]]: ...

    def classifier(self) -> Classifier: ...

    def begin(self, stream: bool) -> None: ...

    def place(self, chunk: Chunk) -> list[Record]: ...

    def early(self) -> list[Record]: ...

    def finish(self) -> list[Record]: ...

    def size(self) -> int: ...

    def reserved(self) -> int: ...


class Pieces:
    """Accumulates output into fixed-size pieces."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray()

    def add(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """Pieces of exactly ``size`` bytes as they fill; the rest waits for more."""
        view = memoryview(data).cast("B")
        if self.buf:
            need = self.size - len(self.buf)
            self.buf += view[:need]
            view = view[need:]
            if len(self.buf) < self.size:
                return
            yield bytes(self.buf)
            self.buf = bytearray()
        while len(view) >= self.size:
            yield bytes(view[: self.size])
            view = view[self.size :]
        if view:
            self.buf += view

    def zeros(self, n: int) -> Iterator[bytes]:
        while n > 0:
            step = min(n, self.size)
            yield from self.add(bytes(step))
            n -= step

    def flush(self) -> Iterator[bytes]:
        if self.buf:
            yield bytes(self.buf)
            self.buf = bytearray()


# -- the file sink ---------------------------------------------------------------------
def _pwrite(fd: int, data: Buffer, offset: int) -> None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as exc:
        raise QcowlibIOError(f"write error: {exc.strerror}", offset=offset) from None


def truncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None


def _groups(records: list[Record], holes: int) -> list[tuple[int, list[Buffer]]]:
    """Records as groups of parts written back to back (zero runs left out if asked)."""
    out: list[tuple[int, list[Buffer]]] = []
    end = -1
    for offset, data in records:
        spans = [(0, len(data))] if not holes else nonzero_runs(data, holes)
        view = memoryview(data).cast("B")
        for s, e in spans:
            if out and end == offset + s:
                out[-1][1].append(view[s:e])
            else:
                out.append((offset + s, [view[s:e]]))
            end = offset + e
    return out


class _FileSink:
    """Data records to writer threads (in guest order), metadata written in place."""

    def __init__(self, fd: int, layout: OutputLayout, tasks: TaskQueue) -> None:
        self.fd = fd
        self.holes = layout.holes
        self.writer = DataWriter(fd)
        self.tasks = tasks
        self.stager = AppendWriter(self.writer, tasks, layout.data_start) if layout.stage else None

    def data(self, records: list[Record], done: Callable[[], None]) -> None:
        if self.stager is not None:
            for offset, data in records:
                self.stager.skip_to(offset)
                self.stager.append(data)
            done()
            return
        groups = _groups(records, self.holes)
        writer = self.writer

        def write() -> None:
            for offset, parts in groups:
                writer.write(offset, parts)

        self.tasks.submit(write, done)

    def close(self) -> None:
        try:
            if self.stager is not None:
                self.stager.close()
            self.tasks.join()
        finally:
            self.writer.close()


def write_file(
    layout: OutputLayout,
    fd: int,
    *,
    progress: Progress | None = None,
    hashers: Sequence[HashSink] = (),
    preallocation: str = "off",
) -> int:
    """Write the image ``layout`` plans into ``fd`` (a new, empty file) in one read pass.

    ``preallocation`` ``falloc`` or ``full`` then allocates the data area from
    ``layout.data_start`` to the end (:func:`qcowlib.core.space.preallocate`).
    Returns the file size.  ``hashers`` are fed the file's bytes in file order once it
    is complete (from the file: the source is not read again).  Raises
    :class:`QcowlibIOError` on write errors; read errors from the source propagate.
    """
    layout.begin(stream=False)
    truncate(fd, layout.data_start)
    reserve(fd, layout.data_start, layout.reserved())
    clf = layout.classifier()
    total = layout.virtual_size
    with TaskQueue(WORKERS, 2 * WORKERS, name="qcowlib-write") as tasks:
        sink = _FileSink(fd, layout, tasks)
        chunks = clf.chunks(layout.ranges())
        try:
            for chunk in chunks:
                try:
                    records = layout.place(chunk)
                except BaseException:
                    clf.release(chunk)
                    raise
                sink.data(records, _releaser(clf, chunk))
                for offset, data in layout.early():
                    _pwrite(fd, data, offset)
                if progress:
                    progress(min(total, chunk.end * layout.unit), total)
        finally:
            chunks.close()
            sink.close()
    for offset, data in layout.finish():
        _pwrite(fd, data, offset)
    size = layout.size()
    truncate(fd, size)
    preallocate(fd, layout.data_start, size, preallocation)
    if hashers:
        hash_written(fd, size, hashers)
    if progress:
        progress(total, total)
    return size


def _releaser(clf: Classifier, chunk: Chunk) -> Callable[[], None]:
    def release() -> None:
        clf.release(chunk)

    return release


def hash_written(fd: int, size: int, hashers: Sequence[HashSink]) -> None:
    """Feed ``size`` bytes of ``fd`` from offset 0 to ``hashers`` (holes as zeros, not
    read).  Each buffer goes to all hashers at once, one thread each (hashlib releases
    the GIL on large buffers, as :class:`qcowlib.core.digest.MultiHasher` relies on)."""
    from concurrent.futures import ThreadPoolExecutor

    view = aligned_buffer(HASH_CHUNK)
    zeros = memoryview(bytes(HASH_CHUNK))
    first, *rest = hashers
    with ThreadPoolExecutor(max(1, len(rest)), thread_name_prefix="qcowlib-hash") as pool:

        def feed(data: memoryview) -> None:
            futures = [pool.submit(h.update, data) for h in rest]  # type: ignore[arg-type]
            try:
                first.update(data)  # type: ignore[arg-type]
            finally:
                for f in futures:
                    f.result()

        pos = 0
        while pos < size:
            data_at = _next_data(fd, pos, size)
            while pos < data_at:  # a hole
                n = min(HASH_CHUNK, data_at - pos)
                feed(zeros[:n])
                pos += n
            if pos >= size:
                break
            n = min(HASH_CHUNK, size - pos)
            try:
                got = os.preadv(fd, [view[:n]], pos)
            except OSError as exc:
                raise QcowlibIOError(f"read error: {exc.strerror}", offset=pos) from None
            if got != n:
                raise QcowlibIOError("output file shorter than written", offset=pos + got)
            feed(view[:n])
            pos += n


def _next_data(fd: int, pos: int, size: int) -> int:
    """Where data starts at or after ``pos`` (``pos`` where holes are not reported)."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_DATA), size)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size  # nothing but a hole up to the end
        return pos  # holes not reported here (a device): read everything


# -- the stream sink -------------------------------------------------------------------
def _signature(chunk: Chunk, records: list[Record]) -> bytes:
    """What the plan fixed about a chunk: its kinds and where its records went."""
    h = hashlib.blake2b(digest_size=16)
    h.update(chunk.first.to_bytes(8, "little"))
    h.update(chunk.kinds.tobytes())
    spans = np.array([(o, len(d)) for o, d in records], dtype=np.int64)
    h.update(spans.tobytes())
    return h.digest()


class LayoutStream:
    """An image as an in-order stream whose exact ``size`` is known before its first
    byte: ``layout`` planned by a first pass over the source, emitted by a second."""

    def __init__(self, layout: OutputLayout, *, chunk_size: int = STREAM_CHUNK) -> None:
        self.layout = layout
        self.chunk_size = chunk_size
        self._ranges = layout.ranges()
        layout.begin(stream=True)
        self._plan: list[bytes] = []
        clf = layout.classifier()
        for chunk in clf.chunks(self._ranges):
            try:
                self._plan.append(_signature(chunk, layout.place(chunk)))
            finally:
                clf.release(chunk)
        meta = sorted(layout.finish(), key=lambda r: r[0])
        self._head = [r for r in meta if r[0] < layout.data_start]
        self._tail = [r for r in meta if r[0] >= layout.data_start]
        #: Exact length of the image in bytes.
        self.size: int = layout.size()

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    def chunks(
        self, progress: Progress | None = None, hashers: Sequence[HashSink] = ()
    ) -> Iterator[bytes]:
        """The whole image in pieces of ``chunk_size`` bytes (the last may be shorter),
        each fed to ``hashers`` before it is yielded."""
        for piece in self._pieces(progress):
            for h in hashers:
                h.update(piece)
            yield piece

    def _pieces(self, progress: Progress | None) -> Iterator[bytes]:
        layout = self.layout
        out = Pieces(self.chunk_size)
        pos = 0

        def put(offset: int, data: Buffer) -> Iterator[bytes]:
            nonlocal pos
            if offset < pos:
                raise QcowlibError("internal: output records out of file order")
            yield from out.zeros(offset - pos)
            yield from out.add(data)
            pos = offset + len(data)

        for offset, data in self._head:
            yield from put(offset, data)
        layout.begin(stream=True)
        clf = layout.classifier()
        total = layout.virtual_size
        k = 0
        for chunk in clf.chunks(self._ranges):
            try:
                records = layout.place(chunk)
                if k >= len(self._plan) or self._plan[k] != _signature(chunk, records):
                    raise SourceChanged()
                k += 1
                for offset, data in records:
                    yield from put(offset, data)
            finally:
                clf.release(chunk)
            if progress:
                progress(min(total, chunk.end * layout.unit), total)
        if k != len(self._plan):
            raise SourceChanged()
        for offset, data in self._tail:
            yield from put(offset, data)
        if pos > self.size:
            raise QcowlibError("internal: output larger than planned")
        yield from out.zeros(self.size - pos)
        yield from out.flush()


def write_image(
    layout: OutputLayout,
    dst: str,
    *,
    protect: tuple[str, ...] = (),
    progress: Progress | None = None,
    hashers: Sequence[HashSink] = (),
    preallocation: str = "off",
) -> int:
    """:func:`write_file` into a new file at ``dst`` (a temporary name, renamed into
    place when complete; never over a file in ``protect``).  Returns its size."""
    from qcowlib.core.sinks import atomic_output

    with atomic_output(dst, protect=protect) as fd:
        return write_file(
            layout, fd, progress=progress, hashers=hashers, preallocation=preallocation
        )
