"""The output plan's input: a source disk read and classified unit by unit, in order.

Every writer of a new image (:mod:`qcowlib.core.emit`) asks the chain's map which units
(clusters, blocks, grains) may hold data (:func:`candidate_units`: run arrays, nothing
read), then reads those through a :class:`Classifier`.  Each chunk of consecutive units
is read into a reused buffer from the chain's resolved runs (:mod:`qcowlib.core.runs`:
one positional read per run, no walk of the chain per chunk) and classified with numpy:
all-zero units are left out, units equal to a backing file's are left out, zeros over
non-zero backing data become zero units; with a ``compressor`` (the format's) every
data unit is compressed in the same worker.  The chunks are planned on a feeder thread
and read by :data:`WORKERS` long-lived threads
(:func:`qcowlib.core.pipeline.ordered_map`), and come back in guest order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import Disk, Runs
from qcowlib.core.hostfile import aligned_buffer
from qcowlib.core.pipeline import BufferPool, ordered_map
from qcowlib.core.runs import ChainReader, RunSource

#: Guest bytes read per chunk.
CHUNK = 4 * 1024 * 1024
WORKERS = 2

EMPTY, DATA, ZERO = 0, 1, 2


@dataclass
class Chunk:
    """Classified clusters of one read: a kind per cluster and the bytes to store."""

    first: int
    kinds: npt.NDArray[np.uint8]
    data: memoryview
    #: Compressed payload per cluster (None: store uncompressed).
    compressed: list[bytes | None]
    buffer: memoryview

    @property
    def end(self) -> int:
        return self.first + len(self.kinds)


_probe = threading.local()


def worth_compressing(data: memoryview) -> bool:
    """Whether deflating ``data`` is worth its cost: False when a zstd level 1 pass (a
    few microseconds for 64 KiB) gains nothing at all.

    Deflate at QEMU's default level spends ~1.1 ms on 64 KiB of random data (58 MB/s)
    and ~0.35 ms on text; on a disk of mixed data three quarters of a ``-c`` convert
    went into finding that random clusters do not compress.  zstd level 1 looks for
    repeats in the whole cluster (deflate's window is 4 KiB) and entropy-codes the
    literals, so what it cannot shrink deflate does not shrink either, but for
    contrived inputs where it would save a few bytes at most; such clusters are then
    stored as they are, as QEMU stores what does not compress.
    """
    comp = getattr(_probe, "zstd", None)
    if comp is None:
        import zstandard

        comp = _probe.zstd = zstandard.ZstdCompressor(level=1)
    return len(comp.compress(data)) < len(data)


@dataclass
class _Job:
    first: int
    n: int
    buffer: memoryview
    runs: tuple[Runs, int, int] | None
    back_runs: tuple[Runs, int, int] | None


def cluster_chunks(ranges: list[tuple[int, int]], per_chunk: int) -> Iterator[tuple[int, int]]:
    """``(first, count)`` pieces of cluster ranges, at most ``per_chunk`` clusters each."""
    for first, end in ranges:
        pos = first
        while pos < end:
            n = min(per_chunk, end - pos)
            yield pos, n
            pos += n


class Classifier:
    """Reads and classifies clusters of ``src`` (None: an empty disk) of ``size`` bytes."""

    def __init__(
        self,
        src: Disk | None,
        size: int,
        cluster_size: int,
        *,
        sparse: bool = True,
        backing: Disk | None = None,
        buffers: int = 5 * WORKERS + 2,
        compressor: Callable[[memoryview], bytes | None] | None = None,
    ) -> None:
        self.src = src
        self.size = size
        self.cs = cluster_size
        #: Payload of a data cluster (None: store it as it is), in the reading worker.
        self.compressor = compressor
        self.sparse = sparse
        self.backing = backing
        self.per_chunk = max(1, CHUNK // cluster_size)
        # Buffers are made when first needed (a small disk never needs them all), at
        # most ``buffers`` of them; then the planner waits for one to come back.
        self.buffers = buffers
        self._pool: BufferPool | None = None
        self._local = threading.local()
        self._reader: ChainReader | None = None
        self._back_reader: ChainReader | None = None

    def release(self, chunk: Chunk) -> None:
        """Give a chunk's buffer back once nothing refers to its data any more."""
        if self._pool is not None:
            self._pool.put(chunk.buffer)

    def _backing_buffer(self, size: int) -> memoryview:
        """This worker thread's buffer for the backing's bytes (used within one read)."""
        buf: memoryview | None = getattr(self._local, "backing", None)
        if buf is None:
            buf = self._local.backing = aligned_buffer(self.per_chunk * self.cs)
        return buf[:size]

    def _jobs(self, ranges: list[tuple[int, int]], pool: BufferPool) -> Iterator[_Job]:
        cs = self.cs
        src = RunSource(self.src) if self.src is not None else None
        back = RunSource(self.backing) if self.backing is not None else None
        for first, n in cluster_chunks(ranges, self.per_chunk):
            start = first * cs
            length = min(n * cs, self.size - start)
            runs = src.get(start, start + length) if src is not None and length > 0 else None
            back_runs = None
            if back is not None:
                blen = min(length, back.size - start)
                if blen > 0:
                    back_runs = back.get(start, start + blen)
            yield _Job(first, n, pool.get(), runs, back_runs)

    def _read(self, job: _Job) -> Chunk:
        cs = self.cs
        first, n = job.first, job.n
        start = first * cs
        length = min(n * cs, self.size - start)
        buf = job.buffer
        view = buf[: n * cs]
        if job.runs is not None:
            assert self._reader is not None
            runs, a, b = job.runs
            self._reader.read(runs, a, b, start, view[:length])
        if length < n * cs:
            view[max(0, length) :] = bytes(n * cs - max(0, length))
        arr = np.frombuffer(view, dtype=np.uint64).reshape(n, cs // 8)
        # Most data clusters have a non-zero first word; only the rest are scanned whole.
        if self.sparse:
            nonzero = arr[:, 0] != 0
            rest = np.flatnonzero(~nonzero)
            if rest.size:
                nonzero[rest] = arr[rest].any(axis=1)
        else:
            nonzero = np.ones(n, dtype=bool)
        kinds = np.where(nonzero, DATA, EMPTY).astype(np.uint8)
        if self.backing is not None:
            bbuf = self._backing_buffer(n * cs)
            blen = 0
            if job.back_runs is not None:
                assert self._back_reader is not None
                runs, a, b = job.back_runs
                blen = min(length, self.backing.virtual_size - start)
                self._back_reader.read(runs, a, b, start, bbuf[:blen])
            if blen < n * cs:
                bbuf[blen:] = bytes(n * cs - blen)
            barr = np.frombuffer(bbuf, dtype=np.uint64).reshape(n, cs // 8)
            same = ~(arr != barr).any(axis=1)
            back_nonzero = barr.any(axis=1)
            kinds = np.where(same, EMPTY, np.where(nonzero, DATA, ZERO)).astype(np.uint8)
            kinds[~nonzero & ~back_nonzero] = EMPTY
        compressed: list[bytes | None] = [None] * n
        compressor = self.compressor
        if compressor is not None:
            for i in np.flatnonzero(kinds == DATA).tolist():
                compressed[i] = compressor(view[i * cs : (i + 1) * cs])
        return Chunk(first, kinds, view, compressed, buf)

    def chunks(self, ranges: list[tuple[int, int]]) -> Generator[Chunk, None, None]:
        """Classified chunks over ``ranges`` in guest order (the caller releases them)."""
        pool = self._pool = BufferPool(self.per_chunk * self.cs, self.buffers)
        self._reader = ChainReader(self.src) if self.src is not None else None
        self._back_reader = ChainReader(self.backing) if self.backing is not None else None
        results = ordered_map(
            self._jobs(ranges, pool),
            self._read,
            workers=WORKERS,
            ahead=2 * WORKERS + 1,
            on_close=pool.close,
            name="qcowlib-read",
        )
        try:
            yield from results
        finally:
            results.close()


def candidate_units(disk: Disk | None, unit: int) -> list[tuple[int, int]]:
    """Unit ranges ``[first, end)`` of ``disk`` that may hold non-zero data, from the
    chain's map alone (nothing is read; None: an empty disk)."""
    if disk is None:
        return []
    first, end = RunSource(disk).nonzero_units(unit)
    return list(zip(first.tolist(), end.tolist(), strict=True))


def merge_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of two lists of ``[start, end)`` ranges, sorted and merged."""
    out: list[tuple[int, int]] = []
    for first, end in sorted(a + b):
        if out and out[-1][1] >= first:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return out


def data_runs(kinds: npt.NDArray[np.uint8]) -> list[tuple[int, int]]:
    """``[start, end)`` index runs of DATA entries in ``kinds``."""
    flags = np.concatenate(([False], kinds == DATA, [False]))
    edges = np.flatnonzero(flags[1:] != flags[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))
