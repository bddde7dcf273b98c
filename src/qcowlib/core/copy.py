"""Data movement from a disk's extents into a raw output, holes left as holes.

The chain's map is resolved into run arrays (:mod:`qcowlib.core.runs`); the ranges
that may hold data are cut into chunks, read by two long-lived threads into reused
page-aligned buffers (one positional read per run), scanned for zero blocks with numpy,
and the non-zero blocks written at their guest offsets by two writer threads, whole
pages straight to the disk (:class:`qcowlib.core.hostfile.DataWriter`).  Where the output
cannot be written that way and zero detection is off (``-S 0``), data runs are copied
in the kernel with ``copy_file_range`` instead.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import RUN_COMPRESSED, RUN_DATA, Disk, Runs
from qcowlib.core.hostfile import DIRECT_ALIGN, DataWriter, punch_hole
from qcowlib.core.pipeline import BufferPool, TaskQueue, ordered_map
from qcowlib.core.runs import ChainReader, RunSource
from qcowlib.core.zero import nonzero_runs
from qcowlib.errors import QcowlibIOError

#: Guest bytes per chunk; each buffer of the pool is this large.
CHUNK = 4 * 1024 * 1024
#: Reader threads and writer threads: reads, zero scans and writes release the GIL,
#: so two of each keep both cores and the disk busy; more only adds memory.
WORKERS = 2
#: Buffers: chunks being read, waiting in order, and being written.
BUFFERS = 5 * WORKERS + 2

#: Output ranges are reserved (``posix_fallocate``) only when there are at most this
#: many: a call per range of a fragmented source costs more than reserving saves.
RESERVE_MAX_RANGES = 1024

Progress = Callable[[int, int], None]
I64 = npt.NDArray[np.int64]


def _copy_range_kernel(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> bool:
    """Copy with ``copy_file_range``; False when the kernel cannot (then use read/write)."""
    done = 0
    while done < n:
        try:
            got = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
        except OSError as exc:
            if done == 0:
                return False  # not supported here: the caller reads and writes instead
            raise QcowlibIOError(
                f"copy failed: {exc.strerror}", errno=exc.errno, offset=dst_off + done
            ) from None
        if got == 0:
            break
        done += got
    return done == n


@dataclass
class _Segment:
    """A guest byte range of a job, read into the job's buffer at ``at``; ``runs[a:b]``
    are the runs over it."""

    start: int
    length: int
    at: int
    runs: Runs
    a: int
    b: int


@dataclass
class _Job:
    """Segments packed into one buffer: a large range is one segment of a chunk, small
    ranges of a fragmented source share a job (a job per range spent the copy's time in
    the pipeline)."""

    segments: list[_Segment]
    buffer: memoryview

    @property
    def end(self) -> int:
        last = self.segments[-1]
        return last.start + last.length


@dataclass
class _Done:
    """A job read: the ``(buffer start, buffer end, guest offset)`` parts of its buffer
    left to write, and the ``(guest offset, length)`` parts found to be zeros (holes to
    punch where the output was reserved)."""

    job: _Job
    writes: list[tuple[int, int, int]]
    zeros: list[tuple[int, int]]


def data_ranges(disk: Disk, unit: int) -> tuple[I64, I64]:
    """Guest byte ranges ``[start, end)`` that may hold data, rounded out to ``unit``, as
    two arrays (a fragmented source has hundreds of thousands: no tuple for each)."""
    first, end = RunSource(disk).nonzero_units(unit)
    return first * unit, np.minimum(end * unit, disk.virtual_size)


def _pieces(starts: I64, ends: I64, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, length)`` pieces of the ranges, at most ``chunk`` bytes each."""
    for at in range(0, starts.size, 4096):  # a slice of the arrays as ints at a time
        for pos, stop in zip(
            starts[at : at + 4096].tolist(), ends[at : at + 4096].tolist(), strict=True
        ):
            while pos < stop:
                n = min(chunk, stop - pos)
                yield pos, n
                pos += n


def _reserve(fd: int, starts: I64, ends: I64) -> bool:
    """Allocate the ranges data will go to in a regular output file (best effort).

    Direct writes into allocated (unwritten) blocks were ~10% faster here than into
    holes inside the file's size; blocks found to be zeros are punched out again.
    """
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            os.posix_fallocate(fd, start, end - start)
    except OSError:
        return False
    return True


def _gaps(runs: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The parts of ``[0, length)`` outside the sorted disjoint ``runs``."""
    out: list[tuple[int, int]] = []
    pos = 0
    for s, e in runs:
        if s > pos:
            out.append((pos, s))
        pos = e
    if pos < length:
        out.append((pos, length))
    return out


def write_raw(
    disk: Disk,
    fd: int,
    *,
    sparse_size: int = 4096,
    progress: Progress | None = None,
) -> None:
    """Write ``disk``'s guest-visible bytes into ``fd`` as a sparse raw image.

    Zero and unallocated extents are not written (the file is truncated to size first,
    so they read as zeros).  With ``sparse_size`` > 0, data is also scanned in blocks of
    that size and all-zero blocks are skipped, as ``qemu-img convert -S``; with 0, data
    extents are copied as they are.  Memory is bounded by :data:`BUFFERS` chunks.
    """
    total = disk.virtual_size
    try:
        os.ftruncate(fd, total)
    except OSError as exc:
        raise QcowlibIOError(f"cannot size output: {exc.strerror}", errno=exc.errno) from None
    sink = DataWriter(fd)
    try:
        _copy(disk, sink, sparse_size, progress)
    finally:
        sink.close()
    if progress:
        progress(total, total)


def _copy(disk: Disk, sink: DataWriter, sparse_size: int, progress: Progress | None) -> None:
    total = disk.virtual_size
    unit = sparse_size or 4096
    chunk = max(unit, CHUNK // unit * unit)
    pool = BufferPool(chunk, BUFFERS)
    source = RunSource(disk)
    reader = ChainReader(disk)
    in_kernel = sparse_size == 0 and not sink.use_direct
    starts, ends = data_ranges(disk, unit)
    reserved = starts.size <= RESERVE_MAX_RANGES and _reserve(sink.fd, starts, ends)

    def work(job: _Job) -> _Done:
        done = _Done(job, [], [])
        for seg in job.segments:
            view = job.buffer[seg.at : seg.at + seg.length]
            if in_kernel:
                parts = _copy_in_kernel(reader, sink, seg, view)
            elif sparse_size:
                reader.read(seg.runs, seg.a, seg.b, seg.start, view)
                parts = nonzero_runs(view, sparse_size)
                if reserved:
                    done.zeros += [(seg.start + s, e - s) for s, e in _gaps(parts, seg.length)]
            else:
                reader.read(seg.runs, seg.a, seg.b, seg.start, view)
                parts = [(0, seg.length)]
            done.writes += [(seg.at + s, seg.at + e, seg.start + s) for s, e in parts]
        return done

    def write(done: _Done) -> Callable[[], None]:
        def run() -> None:
            view = done.job.buffer
            for s, e, guest in done.writes:
                sink.write(guest, [view[s:e]])
            for guest, n in done.zeros:
                punch_hole(sink.fd, guest, n)

        return run

    jobs = _jobs(_pieces(starts, ends, chunk), chunk, source, pool)
    results = ordered_map(
        jobs, work, workers=WORKERS, ahead=2 * WORKERS + 1, on_close=pool.close,
        name="qcowlib-read",
    )  # fmt: skip
    try:
        with TaskQueue(WORKERS, 2 * WORKERS, name="qcowlib-write") as tasks:
            for done in results:
                tasks.submit(write(done), _giver(pool, done.job.buffer))
                if progress:
                    progress(done.job.end, total)
            tasks.join()
    finally:
        results.close()


def _jobs(
    pieces: Iterator[tuple[int, int]], chunk: int, source: RunSource, pool: BufferPool
) -> Iterator[_Job]:
    """Pieces packed into jobs of at most ``chunk`` bytes, each with a buffer of the pool."""
    batch: list[_Segment] = []
    used = 0
    for start, length in pieces:
        at = -(-used // DIRECT_ALIGN) * DIRECT_ALIGN  # page-aligned in the buffer (O_DIRECT)
        if batch and at + length > chunk:
            yield _Job(batch, pool.get())
            batch, at = [], 0
        runs, a, b = source.get(start, start + length)
        batch.append(_Segment(start, length, at, runs, a, b))
        used = at + length
    if batch:
        yield _Job(batch, pool.get())


def _giver(pool: BufferPool, buf: memoryview) -> Callable[[], None]:
    def give() -> None:
        pool.put(buf)

    return give


def _copy_in_kernel(
    reader: ChainReader, sink: DataWriter, seg: _Segment, view: memoryview
) -> list[tuple[int, int]]:
    """Copy a segment's data runs with ``copy_file_range`` where the kernel can; read the
    rest into ``view`` (the segment's part of its buffer) and return the byte ranges of
    it to write."""
    runs = seg.runs
    end = seg.start + seg.length
    rest: list[tuple[int, int]] = []
    for i in range(seg.a, seg.b):
        s = max(seg.start, int(runs.start[i]))
        e = min(end, int(runs.start[i] + runs.length[i]))
        if e <= s:
            continue
        kind = int(runs.kind[i])
        if runs.hole[i] or kind not in (RUN_DATA, RUN_COMPRESSED):
            continue  # reads as zeros: the output is a hole there already
        host_file = reader.files[int(runs.depth[i])]
        if (
            kind == RUN_DATA
            and host_file is not None
            and _copy_range_kernel(
                host_file.fd, int(runs.host[i]) + s - int(runs.start[i]), sink.fd, s, e - s
            )
        ):
            continue
        reader.read(runs, i, i + 1, s, view[s - seg.start : e - seg.start])
        rest.append((s - seg.start, e - seg.start))
    return rest
