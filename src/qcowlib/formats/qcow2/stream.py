"""Serializing a whole disk as a new image emitted strictly in file order.

A :class:`Qcow2Serializer` plans the complete output layout first (metadata from the
source's extent map as :mod:`qcowlib.formats.qcow2.output` plans it, then one classifying
pass over the source: which clusters hold data, how large each compresses), so its
exact size is known before the first byte; then it emits header, refcount table and
blocks, L1 and L2 tables and data in file order, reading the source a second time.
Written to a file it is ``flatten``; handed to an HTTP body it is a streamed upload
with no temporary file.  Memory is bounded: one chunk of output and the per-data-cluster
plan (16 bytes per stored cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import aligned_buffer
from qcowlib.errors import InvalidArgument, QcowlibError, SourceChanged
from qcowlib.formats.qcow2 import tables
from qcowlib.formats.qcow2.classify import Classifier
from qcowlib.formats.qcow2.layout import (
    CreateOptions,
    build_new_header,
    build_refcount_structures,
    plan_layout,
)
from qcowlib.formats.qcow2.output import candidate_l2_tables, candidate_ranges
from qcowlib.formats.qcow2.placement import (
    DataPlacer,
    chunk_payload_lengths,
    chunk_records,
    data_clusters,
    l2_entries,
)

Progress = Callable[[int, int], None]
#: Output pieces; under uWSGI's 1 MiB chunk limit for Glance uploads.
STREAM_CHUNK = 512 * 1024


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


class Qcow2Serializer:
    """A disk as a standalone qcow2 image (no backing file), size known up front."""

    def __init__(
        self,
        src: Disk,
        opts: CreateOptions,
        *,
        compress: bool = False,
        sparse: bool = True,
        chunk_size: int = STREAM_CHUNK,
    ) -> None:
        if opts.backing_file:
            raise InvalidArgument("a serialized image has no backing file")
        if opts.preallocation != "off":
            raise InvalidArgument("preallocation is not supported here")
        self.src = src
        self.opts = opts
        self.compress = compress
        self.sparse = sparse
        self.chunk_size = chunk_size
        cs = opts.cluster_size
        self.cs = cs
        self.ranges = candidate_ranges(src, cs)
        self._plan()

    def _classifier(self) -> Classifier:
        return Classifier(
            self.src,
            self.opts.virtual_size,
            self.cs,
            compress=self.compress,
            compression_type=self.opts.compression_type_id,
            sparse=self.sparse,
        )

    def _plan(self) -> None:
        cs = self.cs
        # The metadata area is planned from the source's extent map exactly as the
        # one-pass writer (convert) plans it: L2 tables for every candidate range, room
        # for every candidate cluster; the data is placed chunk by chunk by the same
        # DataPlacer.  The image is then the same bytes whichever of the two wrote it,
        # so flatten to a file needs one read pass (tests/ops/test_flatten.py checks
        # it, -c included).
        self.l2_span = cs // self.opts.l2_entry_size
        l2_needed, n_candidates = candidate_l2_tables(self.opts, self.ranges)
        self.layout = plan_layout(self.opts, l2_needed, n_candidates)
        base = self.layout.data_offset
        placer = DataPlacer(cs, self.opts.refcount_order, base, base // cs + n_candidates + 2)
        idx_parts: list[np.ndarray] = []
        len_parts: list[np.ndarray] = []
        host_parts: list[np.ndarray] = []
        classifier = self._classifier()
        for chunk in classifier.chunks(self.ranges):
            try:
                local = data_clusters(chunk)
                clen = chunk_payload_lengths(chunk, local)
                idx_parts.append(local + chunk.first)
                len_parts.append(clen)
                host_parts.append(placer.place_chunk(clen))
            finally:
                classifier.release(chunk)
        self.data_idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
        self.clen = np.concatenate(len_parts) if len_parts else np.zeros(0, np.int64)
        self.host = np.concatenate(host_parts) if host_parts else np.zeros(0, np.uint64)
        self.size = max(placer.pos, base)
        self.refcounts = placer.refcounts(base)

    # -- emission ------------------------------------------------------------------------
    def _l2_table(self, l1_index: int) -> bytes:
        cs = self.cs
        lo, hi = l1_index * self.l2_span, (l1_index + 1) * self.l2_span
        a, b = np.searchsorted(self.data_idx, [lo, hi])
        idx = self.data_idx[a:b] - lo
        clen = self.clen[a:b]
        entries = l2_entries(self.host[a:b], clen, self.opts.cluster_bits)
        if self.opts.extended_l2:
            table = np.zeros(2 * self.l2_span, dtype=np.uint64)
            table[2 * idx] = entries
            table[2 * idx + 1] = np.where(clen > 0, np.uint64(0), np.uint64(0xFFFF_FFFF))
        else:
            table = np.zeros(self.l2_span, dtype=np.uint64)
            table[idx] = entries
        raw = tables.encode_table(table)
        return raw + bytes(cs - len(raw)) if len(raw) < cs else raw

    def metadata(self) -> Iterator[bytes]:
        """Header cluster, refcount table and blocks, L1 and L2 tables, in file order."""
        lay = self.layout
        cs = self.cs
        header = build_new_header(self.opts, lay)
        yield header + bytes(cs - len(header))
        reftable, blocks = build_refcount_structures(lay, self.refcounts, self.opts.refcount_order)
        yield reftable
        yield blocks
        l1 = lay.l2_offsets.copy()
        l1[l1 != 0] |= np.uint64(tables.OFLAG_COPIED)
        raw_l1 = tables.encode_table(l1)
        yield raw_l1 + bytes(-len(raw_l1) % cs)
        for l1_index in np.flatnonzero(lay.l2_offsets).tolist():
            yield self._l2_table(l1_index)

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    def chunks(self, progress: Progress | None = None) -> Iterator[bytes]:
        """The whole image, in pieces of ``chunk_size`` bytes (the last may be shorter)."""
        out = Pieces(self.chunk_size)
        written = 0
        for part in self.metadata():
            written += len(part)
            yield from out.add(part)
        if written != self.layout.data_offset:
            raise QcowlibError("internal: metadata size differs from the plan")
        cs = self.cs
        k = 0
        size = self.opts.virtual_size
        classifier = self._classifier()
        for chunk in classifier.chunks(self.ranges):
            try:
                local = data_clusters(chunk)
                n = int(local.size)
                clen = chunk_payload_lengths(chunk, local)
                if (
                    k + n > self.data_idx.size
                    or not np.array_equal(self.data_idx[k : k + n], local + chunk.first)
                    or not np.array_equal(self.clen[k : k + n], clen)
                ):
                    raise SourceChanged()
                host = self.host[k : k + n]
                for target, data in chunk_records(chunk, local, host, clen, cs):
                    if target > written:
                        yield from out.zeros(target - written)
                        written = target
                    yield from out.add(data)
                    written += len(data)
                k += n
            finally:
                classifier.release(chunk)
            if progress:
                progress(min(size, chunk.end * cs), size)
        if k != self.data_idx.size:
            raise SourceChanged()
        if written < self.size:
            yield from out.zeros(self.size - written)
        yield from out.flush()


class RawSerializer:
    """A disk as raw bytes (zeros emitted from a shared buffer, not read)."""

    def __init__(self, src: Disk, *, chunk_size: int = STREAM_CHUNK) -> None:
        self.src = src
        self.size = src.virtual_size
        self.chunk_size = chunk_size

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    def chunks(self, progress: Progress | None = None) -> Iterator[bytes]:
        zero = bytes(self.chunk_size)
        buf = aligned_buffer(self.chunk_size)
        for ext in self.src.extents():
            pos = ext.start
            while pos < ext.end:
                n = min(self.chunk_size, ext.end - pos)
                if ext.reads_zero:
                    yield zero[:n]
                else:
                    view = buf[:n]
                    self.src.read_extent(ext.clip(pos, pos + n), view)
                    yield bytes(view)
                pos += n
                if progress:
                    progress(pos, self.size)
