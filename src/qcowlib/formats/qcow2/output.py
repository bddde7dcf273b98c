"""The one writer of new qcow2 images (``convert -O qcow2``, ``flatten``, its stream).

:class:`Qcow2Layout` is what :mod:`qcowlib.core.emit` drives into a file or a stream.
The metadata area (header, refcount table and blocks, L1, the L2 tables the source
needs) is planned up front from the source's extent map (:func:`plan_layout`); data
clusters follow it in guest order, placed chunk by chunk
(:mod:`qcowlib.formats.qcow2.placement`: compressed payloads packed, whole clusters
after them).  All-zero clusters are not stored; with ``compress`` each cluster is
compressed by the reading workers and kept uncompressed when compression does not
shrink it (as QEMU does).  Written to a file, each L2 table goes out as soon as its
range is done, so memory stays bounded whatever the disk size.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import numpy as np

from qcowlib.core.disk import Disk
from qcowlib.core.emit import LayoutStream, Record, write_file
from qcowlib.core.hostfile import pwrite_all
from qcowlib.core.plan import (
    DATA,
    ZERO,
    Chunk,
    Classifier,
    candidate_units,
    merge_ranges,
    worth_compressing,
)
from qcowlib.errors import QcowlibIOError
from qcowlib.formats.qcow2 import tables
from qcowlib.formats.qcow2.compress import compress_cluster
from qcowlib.formats.qcow2.header import COMPRESSION_TYPE_ZLIB
from qcowlib.formats.qcow2.layout import (
    CreateOptions,
    build_new_header,
    build_refcount_structures,
    plan_layout,
)
from qcowlib.formats.qcow2.placement import (
    DataPlacer,
    chunk_payload_lengths,
    chunk_records,
    l2_entries,
)

Progress = Callable[[int, int], None]


def candidate_l2_tables(
    opts: CreateOptions, candidates: list[tuple[int, int]]
) -> tuple[np.ndarray, int]:
    """Which L2 tables a new image of ``candidates`` gets, and its most data clusters.

    The metadata area is planned from these before any data is read (every L2 table a
    candidate range touches, refcounts for every candidate cluster).
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


def qcow2_compressor(ctype: int, cluster_size: int) -> Callable[[memoryview], bytes | None]:
    """A qcow2 compressed cluster, or None where compression does not pay."""

    def payload(cluster: memoryview) -> bytes | None:
        if ctype == COMPRESSION_TYPE_ZLIB and not worth_compressing(cluster):
            return None
        data = compress_cluster(cluster, ctype)
        # QEMU keeps a cluster uncompressed unless compression makes it smaller.
        return data if len(data) < cluster_size else None

    return payload


class Qcow2Layout:
    """A new qcow2 image of ``src`` (None: empty) as :mod:`qcowlib.core.emit` writes it.

    With ``backing`` (the image named by ``opts.backing_file``), clusters equal to the
    backing's are left unallocated and zeros over non-zero backing data become zero
    clusters.
    """

    holes = 0

    def __init__(
        self,
        src: Disk | None,
        opts: CreateOptions,
        *,
        compress: bool = False,
        sparse: bool = True,
        backing: Disk | None = None,
        preallocate: bool = False,
    ) -> None:
        self.src = src
        self.opts = opts
        self.compress = compress
        self.sparse = sparse
        self.backing = backing
        self.stage = compress
        cs = self.unit = opts.cluster_size
        self.virtual_size = size = opts.virtual_size
        ranges = candidate_units(src, cs)
        if backing is not None:
            back = [(a, min(b, -(-size // cs))) for a, b in candidate_units(backing, cs)]
            ranges = merge_ranges(ranges, [r for r in back if r[0] < r[1]])
        self._ranges = ranges
        self.preallocate = preallocate
        planned = [(0, -(-size // cs))] if preallocate else ranges
        self.l2_span = cs // opts.l2_entry_size
        l2_needed, self.n_data = candidate_l2_tables(opts, planned)
        self.layout = plan_layout(opts, l2_needed, self.n_data)
        self.data_start = self.layout.data_offset
        self.begin(stream=False)

    def ranges(self) -> list[tuple[int, int]]:
        return self._ranges

    def reserved(self) -> int:
        return 0 if self.compress else sum(b - a for a, b in self._ranges) * self.unit

    def classifier(self) -> Classifier:
        compressor = (
            qcow2_compressor(self.opts.compression_type_id, self.unit) if self.compress else None
        )
        return Classifier(
            self.src,
            self.virtual_size,
            self.unit,
            sparse=self.sparse,
            backing=self.backing,
            compressor=compressor,
        )

    def begin(self, stream: bool) -> None:
        cs, base = self.unit, self.data_start
        self.keep_tables = stream
        self.placer = DataPlacer(cs, self.opts.refcount_order, base, base // cs + self.n_data + 2)
        #: L2 tables being filled (as uint64 arrays), by L1 index.
        self.tables: dict[int, np.ndarray] = {}
        self._done: list[int] = []
        if self.preallocate:
            self._preallocate_all()

    # -- L2 tables -----------------------------------------------------------------------
    def _table(self, l1_index: int) -> np.ndarray:
        table = self.tables.get(l1_index)
        if table is None:
            if int(self.layout.l2_offsets[l1_index]) == 0:
                raise QcowlibIOError("internal: writing into an unplanned L2 table")
            width = self.l2_span * (self.opts.l2_entry_size // 8)
            table = self.tables[l1_index] = np.zeros(width, dtype=np.uint64)
        return table

    def _set_entries(self, clusters: np.ndarray, entries: np.ndarray, bitmap: np.ndarray) -> None:
        """L2 entries for ascending guest ``clusters`` (extended L2: with ``bitmap``)."""
        l1s = clusters // self.l2_span
        bounds = [0, *(np.flatnonzero(np.diff(l1s)) + 1).tolist(), int(clusters.size)]
        for a, b in itertools.pairwise(bounds):
            table = self._table(int(l1s[a]))
            within = clusters[a:b] % self.l2_span
            if self.opts.extended_l2:
                table[2 * within] = entries[a:b]
                table[2 * within + 1] = bitmap[a:b]
            else:
                table[within] = entries[a:b]

    def _table_record(self, l1_index: int) -> Record:
        raw = tables.encode_table(self.tables.pop(l1_index))
        return int(self.layout.l2_offsets[l1_index]), raw

    # -- placing -------------------------------------------------------------------------
    def place(self, chunk: Chunk) -> list[Record]:
        """Place a classified chunk's data clusters; their records in file order."""
        if not self.keep_tables:
            first_l1 = chunk.first // self.l2_span
            self._done += [t for t in self.tables if t < first_l1]
        kinds = chunk.kinds
        zero = kinds == ZERO
        if zero.any():
            if self.opts.version == 2:
                kinds = np.where(zero, DATA, kinds).astype(np.uint8)  # stored as zeros
            else:
                clusters = np.flatnonzero(zero) + chunk.first
                if self.opts.extended_l2:
                    bitmap = np.full(clusters.size, np.uint64(0xFFFF_FFFF << 32))
                    self._set_entries(clusters, np.zeros(clusters.size, np.uint64), bitmap)
                else:
                    entries = np.full(clusters.size, np.uint64(tables.OFLAG_ZERO))
                    self._set_entries(clusters, entries, entries)
        local = np.flatnonzero(kinds == DATA).astype(np.int64)
        if local.size == 0:
            return []
        clen = chunk_payload_lengths(chunk, local)
        host = self.placer.place_chunk(clen)
        entries = l2_entries(host, clen, self.opts.cluster_bits)
        bitmap = np.where(clen > 0, np.uint64(0), np.uint64(0xFFFF_FFFF))
        self._set_entries(local + chunk.first, entries, bitmap)
        return chunk_records(chunk, local, host, clen, self.unit)

    def early(self) -> list[Record]:
        """L2 tables no later chunk touches (file sinks write them as they complete)."""
        done, self._done = self._done, []
        return [self._table_record(t) for t in done]

    def _preallocate_all(self) -> None:
        """preallocation=metadata: every cluster gets a data cluster (not written)."""
        cs = self.unit
        n = -(-self.virtual_size // cs)
        start = self.placer.plain(n)
        hosts = np.uint64(start) + np.arange(n, dtype=np.uint64) * np.uint64(cs)
        entries = hosts | np.uint64(tables.OFLAG_COPIED)
        bitmap = np.full(n, np.uint64(0xFFFF_FFFF))
        self._set_entries(np.arange(n, dtype=np.int64), entries, bitmap)

    # -- metadata ------------------------------------------------------------------------
    def finish(self) -> list[Record]:
        """The L2 tables left, L1, refcount table and blocks, and the header."""
        out = [self._table_record(t) for t in sorted(self.tables)]
        lay = self.layout
        l1 = lay.l2_offsets.copy()
        l1[l1 != 0] |= np.uint64(tables.OFLAG_COPIED)
        # All metadata counts once (unused L2 slots stay valid).
        counts = self.placer.refcounts(lay.data_offset)
        reftable, blocks = build_refcount_structures(lay, counts, self.opts.refcount_order)
        out.append((lay.l1_offset, tables.encode_table(l1)))
        out.append((lay.reftable_offset, reftable))
        out.append((lay.refblocks_offset, blocks))
        out.append((0, build_new_header(self.opts, lay)))
        return out

    def size(self) -> int:
        return max(self.placer.pos, self.data_start)


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
    prealloc = opts.preallocation != "off"
    if prealloc and src is not None and candidate_units(src, opts.cluster_size):
        raise QcowlibIOError("internal: preallocation applies to new empty images")
    layout = Qcow2Layout(
        src, opts, compress=compress, sparse=sparse_size > 0, backing=backing,
        preallocate=prealloc,
    )  # fmt: skip
    end = write_file(layout, fd, progress=progress)
    if opts.preallocation in ("falloc", "full"):
        _preallocate_file(fd, layout.data_start, end, opts.preallocation)
    return end


def qcow2_stream(
    src: Disk, opts: CreateOptions, *, compress: bool = False, chunk_size: int
) -> LayoutStream:
    """``src`` as a standalone qcow2 image streamed in file order, its size known first."""
    return LayoutStream(Qcow2Layout(src, opts, compress=compress), chunk_size=chunk_size)


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
