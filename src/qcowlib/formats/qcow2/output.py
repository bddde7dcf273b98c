"""Writing a new qcow2 image from a source disk in one pass (``convert -O qcow2``).

The metadata area (refcount table and blocks, L1, the L2 tables the source needs) is
planned up front from the source's extent map (:func:`plan_layout`); data clusters
follow it in guest order, and each L2 table is written as soon as its range is done,
so memory stays bounded whatever the disk size.  All-zero clusters are not written;
with ``compress`` each cluster is compressed by the reading workers, output order
preserved, and kept uncompressed when compression does not shrink it (as QEMU does).

Data moves through a bounded pipeline (:mod:`qcowlib.core.pipeline`): two reader
threads fill and classify chunks, this thread lays them out, and two writer threads
write each chunk's data (whole pages straight to the disk, :class:`DataWriter`) and
then give its buffer back.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import numpy as np

from qcowlib._log import get_logger
from qcowlib.core.appendsink import AppendWriter
from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import DataWriter, pwrite_all, reserve
from qcowlib.core.pipeline import TaskQueue
from qcowlib.core.runs import RunSource
from qcowlib.errors import QcowlibIOError
from qcowlib.formats.qcow2 import tables
from qcowlib.formats.qcow2.classify import DATA, WORKERS, ZERO, Chunk, Classifier
from qcowlib.formats.qcow2.layout import (
    CreateOptions,
    Layout,
    build_new_header,
    build_refcount_structures,
    plan_layout,
)
from qcowlib.formats.qcow2.placement import (
    DataPlacer,
    chunk_payload_lengths,
    chunk_records,
    data_clusters,
    l2_entries,
)

log = get_logger(__name__)

Progress = Callable[[int, int], None]


def candidate_ranges(disk: Disk | None, cluster_size: int) -> list[tuple[int, int]]:
    """Guest cluster ranges ``[first, end)`` that may hold non-zero data."""
    if disk is None:
        return []
    first, end = RunSource(disk).nonzero_units(cluster_size)
    return list(zip(first.tolist(), end.tolist(), strict=True))


def candidate_l2_tables(
    opts: CreateOptions, candidates: list[tuple[int, int]]
) -> tuple[np.ndarray, int]:
    """Which L2 tables a new image of ``candidates`` gets, and its most data clusters.

    The metadata area is planned from these before any data is read (every L2 table a
    candidate range touches, refcounts for every candidate cluster), by the one-pass
    writer and the serializer alike, so both lay out the same image.
    """
    cs = opts.cluster_size
    span = cs // opts.l2_entry_size
    l1_size = -(-opts.virtual_size // (span * cs))
    l2_needed = np.zeros(max(l1_size, 1), dtype=bool)
    n_data = 0
    for first, end in candidates:
        l2_needed[first // span : -(-end // span)] = True
        n_data += end - first
    return l2_needed, n_data


def merge_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of two lists of ``[start, end)`` ranges, sorted and merged."""
    out: list[tuple[int, int]] = []
    for first, end in sorted(a + b):
        if out and out[-1][1] >= first:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return out


class Qcow2Writer:
    """Emit a new image into ``fd`` (a fresh, empty file)."""

    def __init__(
        self,
        fd: int,
        opts: CreateOptions,
        candidates: list[tuple[int, int]],
        sink: DataWriter | None = None,
        tasks: TaskQueue | None = None,
        stage: bool = False,
    ) -> None:
        self.fd = fd
        self.sink = sink if sink is not None else DataWriter(fd, direct=False)
        self.tasks = tasks
        self.opts = opts
        self.cs = opts.cluster_size
        cs = self.cs
        l2_needed, n_data = candidate_l2_tables(opts, candidates)
        self.l2_span = cs // opts.l2_entry_size
        self.layout: Layout = plan_layout(opts, l2_needed, n_data)
        self.placer = DataPlacer(
            cs, opts.refcount_order, self.layout.data_offset,
            self.layout.data_offset // cs + n_data + 2,
        )  # fmt: skip
        self.cur_l1: int = -1
        self.cur_l2 = np.zeros(0, dtype=np.uint64)
        #: Data not yet handed to a writer: groups of parts written back to back.
        self.pending: list[tuple[int, list[bytes | memoryview]]] = []
        self.pending_end = -1
        #: With ``stage`` (compressed images: small payloads between whole clusters),
        #: data is copied into aligned staging buffers instead (it only moves forward).
        self.stager = (
            AppendWriter(self.sink, tasks, self.layout.data_offset)
            if stage and tasks is not None
            else None
        )
        try:
            os.ftruncate(fd, self.layout.data_offset)
        except OSError as exc:
            raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None

    # -- L2 tables -----------------------------------------------------------------------
    def _switch_l2(self, l1_index: int) -> None:
        if l1_index == self.cur_l1:
            return
        self._flush_l2()
        self.cur_l1 = l1_index
        self.cur_l2 = np.zeros(self.l2_span * (self.opts.l2_entry_size // 8), dtype=np.uint64)

    def _flush_l2(self) -> None:
        if self.cur_l1 < 0:
            return
        offset = int(self.layout.l2_offsets[self.cur_l1])
        if offset == 0:
            raise QcowlibIOError("internal: writing into an unplanned L2 table")
        self._pwrite(tables.encode_table(self.cur_l2), offset)

    def _set_entries(
        self, clusters: np.ndarray, entries: np.ndarray, bitmap: int | np.ndarray
    ) -> None:
        """L2 entries for ascending guest ``clusters`` (extended L2: with ``bitmap``)."""
        l1s = clusters // self.l2_span
        # ``clusters`` ascend, so each L2 table's entries are one slice.
        bounds = [0, *(np.flatnonzero(np.diff(l1s)) + 1).tolist(), int(clusters.size)]
        for a, b in itertools.pairwise(bounds):
            self._switch_l2(int(l1s[a]))
            within = clusters[a:b] % self.l2_span
            if self.opts.extended_l2:
                self.cur_l2[2 * within] = entries[a:b]
                self.cur_l2[2 * within + 1] = (
                    bitmap[a:b] if isinstance(bitmap, np.ndarray) else bitmap
                )
            else:
                self.cur_l2[within] = entries[a:b]

    def _set_entry(self, cluster: int, entry: int, bitmap: int = 0) -> None:
        self._set_entries(
            np.array([cluster], dtype=np.int64), np.array([entry], dtype=np.uint64), bitmap
        )

    # -- data --------------------------------------------------------------------------
    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as exc:
            raise QcowlibIOError(f"write error: {exc.strerror}", offset=offset) from None

    def _queue(self, data: bytes | memoryview, offset: int) -> None:
        if self.stager is not None:
            self.stager.skip_to(offset)
            self.stager.append(data)
            return
        if self.pending and self.pending_end == offset:
            self.pending[-1][1].append(data)
        else:
            self.pending.append((offset, [data]))
        self.pending_end = offset + len(data)

    def end_chunk(self, done: Callable[[], None] | None = None) -> None:
        """Hand the data queued so far to a writer thread (or write it now), then call
        ``done`` (which gives back the buffer the data lies in)."""
        groups, self.pending, self.pending_end = self.pending, [], -1
        sink = self.sink

        def write() -> None:
            for offset, parts in groups:
                sink.write(offset, parts)

        if self.tasks is not None:
            if groups or done is not None:
                self.tasks.submit(write, done)
            return
        try:
            write()
        finally:
            if done is not None:
                done()

    def wait_writes(self) -> None:
        """Wait for every queued data write (raises the first write error)."""
        self.end_chunk()
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        if self.tasks is not None:
            self.tasks.join()

    def store_chunk(self, chunk: Chunk) -> None:
        """Store a classified chunk's data clusters, placed as the serializer places
        them (:mod:`qcowlib.formats.qcow2.placement`): one placement and one L2 update per
        table for the lot, the data queued in file order."""
        local = data_clusters(chunk)
        if local.size == 0:
            return
        clen = chunk_payload_lengths(chunk, local)
        host = self.placer.place_chunk(clen)
        entries = l2_entries(host, clen, self.opts.cluster_bits)
        bitmap = np.where(clen > 0, np.uint64(0), np.uint64(0xFFFF_FFFF))
        self._set_entries(local + chunk.first, entries, bitmap)
        for offset, data in chunk_records(chunk, local, host, clen, self.cs):
            self._queue(data, offset)

    def add_data(self, cluster: int, data: memoryview) -> None:
        """Store one uncompressed cluster (``len(data)`` may be short at the disk end)."""
        host = self.placer.plain(1)
        self._queue(data, host)
        bitmap = 0xFFFF_FFFF if self.opts.extended_l2 else 0
        self._set_entry(cluster, host | tables.OFLAG_COPIED, bitmap)

    def add_compressed(self, cluster: int, payload: bytes) -> None:
        """Store one compressed cluster, packed after the previous one."""
        clen = np.array([len(payload)], dtype=np.int64)
        host = self.placer.packed(clen)
        self._queue(payload, int(host[0]))
        self._set_entry(cluster, int(l2_entries(host, clen, self.opts.cluster_bits)[0]))

    def add_zero(self, cluster: int) -> None:
        """A cluster that must read as zeros (over a backing file)."""
        if self.opts.version == 2:
            self.add_data(cluster, memoryview(bytes(self.cs)))
        elif self.opts.extended_l2:
            self._set_entry(cluster, 0, 0xFFFF_FFFF << 32)
        else:
            self._set_entry(cluster, tables.OFLAG_ZERO)

    def preallocate_all(self) -> None:
        """preallocation=metadata: every cluster gets a data cluster (not written)."""
        n = -(-self.opts.virtual_size // self.cs)
        cs = self.cs
        start = self.placer.plain(n)
        hosts = np.uint64(start) + np.arange(n, dtype=np.uint64) * np.uint64(cs)
        for l1 in range(-(-n // self.l2_span)):
            lo, hi = l1 * self.l2_span, min(n, (l1 + 1) * self.l2_span)
            self._switch_l2(l1)
            entries = hosts[lo:hi] | np.uint64(tables.OFLAG_COPIED)
            if self.opts.extended_l2:
                self.cur_l2[0 : 2 * (hi - lo) : 2] = entries
                self.cur_l2[1 : 2 * (hi - lo) : 2] = 0xFFFF_FFFF
            else:
                self.cur_l2[: hi - lo] = entries

    # -- finishing -----------------------------------------------------------------------
    def finish(self) -> int:
        """Write L2/L1/refcount structures and the header; returns the file size."""
        self._flush_l2()
        self.wait_writes()
        lay = self.layout
        l1 = lay.l2_offsets.copy()
        l1[l1 != 0] |= np.uint64(tables.OFLAG_COPIED)
        end = max(self.placer.pos, lay.data_offset)
        # All metadata counts once (unused L2 slots stay valid).
        counts = self.placer.refcounts(lay.data_offset)
        reftable, blocks = build_refcount_structures(lay, counts, self.opts.refcount_order)
        self._pwrite(tables.encode_table(l1), lay.l1_offset)
        self._pwrite(reftable, lay.reftable_offset)
        self._pwrite(blocks, lay.refblocks_offset)
        self._pwrite(build_new_header(self.opts, lay), 0)
        try:
            os.ftruncate(self.fd, end)
        except OSError as exc:
            raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None
        return end


def write_qcow2(
    src: Disk | None,
    fd: int,
    opts: CreateOptions,
    *,
    compress: bool = False,
    sparse_size: int = 4096,
    backing: Disk | None = None,
    progress: Progress | None = None,
) -> int:
    """Write ``src``'s content (None: an empty disk) into ``fd`` as a new qcow2 image.

    With ``backing`` (the image named by ``opts.backing_file``), clusters equal to the
    backing's are left unallocated and zeros over non-zero backing data become zero
    clusters.  Returns the file size.
    """
    cs = opts.cluster_size
    size = opts.virtual_size
    ranges = candidate_ranges(src, cs)
    if backing is not None:
        back_ranges = [(a, min(b, -(-size // cs))) for a, b in candidate_ranges(backing, cs)]
        ranges = merge_ranges(ranges, [r for r in back_ranges if r[0] < r[1]])
    if opts.preallocation != "off":
        # Every cluster is allocated up front; only then is source data copied in.
        if ranges:
            raise QcowlibIOError("internal: preallocation applies to new empty images")
        writer = Qcow2Writer(fd, opts, [(0, -(-size // cs))])
        writer.preallocate_all()
        return _finish(writer, fd, opts, progress)
    sink = DataWriter(fd)
    try:
        with TaskQueue(WORKERS, 2 * WORKERS, name="qcowlib-write") as tasks:
            writer = Qcow2Writer(fd, opts, ranges, sink, tasks, stage=compress)
            _copy(writer, src, ranges, compress, sparse_size, backing, progress)
            writer.wait_writes()
        writer.tasks = None
        return _finish(writer, fd, opts, progress)
    finally:
        sink.close()


def _finish(writer: Qcow2Writer, fd: int, opts: CreateOptions, progress: Progress | None) -> int:
    end = writer.finish()
    if opts.preallocation in ("falloc", "full"):
        _preallocate_file(fd, writer.layout.data_offset, end, opts.preallocation)
    if progress:
        progress(opts.virtual_size, opts.virtual_size)
    return end


def _copy(
    writer: Qcow2Writer,
    src: Disk | None,
    ranges: list[tuple[int, int]],
    compress: bool,
    sparse_size: int,
    backing: Disk | None,
    progress: Progress | None,
) -> None:
    """Classify ``src``'s candidate clusters and store them, in guest order."""
    opts = writer.opts
    cs = opts.cluster_size
    size = opts.virtual_size
    fd = writer.fd
    if ranges and not compress:
        # Reserve the data area: writes into allocated space are cheaper than delayed
        # allocation, and the file is trimmed to what was used at the end.
        reserve(fd, writer.layout.data_offset, sum(b - a for a, b in ranges) * cs)
    classifier = Classifier(
        src,
        size,
        cs,
        compress=compress,
        compression_type=opts.compression_type_id,
        sparse=sparse_size > 0,
        backing=backing,
    )

    def emit(chunk: Chunk) -> None:
        if np.any(chunk.kinds == ZERO):
            emit_each(chunk)
        else:
            writer.store_chunk(chunk)
        # The buffer goes back to the pool once the writes that point into it are done.
        writer.end_chunk(lambda: classifier.release(chunk))

    def emit_each(chunk: Chunk) -> None:
        # Only over a backing file: zero clusters among the data, cluster by cluster.
        for i in range(len(chunk.kinds)):
            kind = chunk.kinds[i]
            cluster = chunk.first + i
            if kind == DATA:
                payload = chunk.compressed[i]
                if payload is not None:
                    writer.add_compressed(cluster, payload)
                else:
                    end = min(cs, size - cluster * cs)
                    writer.add_data(cluster, chunk.data[i * cs : i * cs + end])
            elif kind == ZERO:
                writer.add_zero(cluster)

    for chunk in classifier.chunks(ranges):
        emit(chunk)
        if progress:
            progress(min(size, chunk.end * cs), size)


def _preallocate_file(fd: int, start: int, end: int, mode: str) -> None:
    """Allocate the data area on disk: ``falloc`` reserves it, ``full`` writes zeros."""
    try:
        if mode == "falloc":
            os.posix_fallocate(fd, start, end - start)
            return
        zero = bytes(1 << 20)
        pos = start
        while pos < end:
            n = min(len(zero), end - pos)
            pwrite_all(fd, zero[:n], pos)
            pos += n
    except OSError as exc:
        raise QcowlibIOError(f"cannot preallocate: {exc.strerror}") from None
