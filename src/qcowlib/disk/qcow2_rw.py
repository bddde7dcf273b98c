"""Writing into an existing qcow2 image in place (qcow2.txt; QEMU's write discipline).

:class:`Qcow2RWDisk` adds ``write``, ``write_zeroes``, ``discard``, ``resize``,
``set_backing`` and ``flush`` to the reader.  The rules it keeps:

* Refcounts are written before any pointer that needs them, and a cluster is freed
  only after the last pointer to it is gone, so a crash leaks at worst.
* Every metadata write is checked against the known metadata areas first (QEMU's
  ``QCOW2_OL_*`` overlap checks); a failed check marks the image corrupt and stops.
* A cluster shared with a snapshot (refcount > 1) is copied before it is changed.
* Images marked corrupt are refused; dirty images must be repaired (``check -r all``)
  before they are written; with lazy refcounts the dirty bit is set while writing and
  cleared on a clean close.
* QEMU's advisory locks are taken on the image (OFD locks on bytes 100+ and 200+), so
  an image a running VM or qemu-io holds for writing is refused, and they cannot open
  it for writing while we do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterable

import numpy as np

from qcowlib.disk._file import HostFile, pwrite_all
from qcowlib.disk.base import ExtentKind
from qcowlib.disk.locks import take_write_locks
from qcowlib.disk.qcow2 import Qcow2Disk, read_header
from qcowlib.errors import (
    CorruptImage,
    InvalidArgument,
    QcowlibError,
    QcowlibIOError,
    UnsupportedFeature,
)
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import refcount as rc
from qcowlib.formats.qcow2 import tables

log = logging.getLogger(__name__)


class Qcow2RWDisk(Qcow2Disk):
    """A qcow2 image open for reading and writing.  Use :func:`open_rw`."""

    def __init__(self, host: HostFile, filename: str, header: hdr.Header) -> None:
        super().__init__(host, filename, header)
        h = header
        if h.corrupt:
            raise CorruptImage(
                "image is marked corrupt; repair it (check -r all) before writing",
                file=filename,
            )
        if h.dirty:
            raise CorruptImage(
                "image was not closed cleanly (dirty); run check -r all before writing",
                file=filename,
            )
        if h.has_data_file:
            raise UnsupportedFeature("writing images with an external data file", file=filename)
        if h.nb_snapshots and h.version == 2:
            log.debug("%s: v2 image with snapshots", filename)
        self.per_block = rc.entries_per_block(self.cluster_bits, h.refcount_order)
        self.max_refcount = rc.max_refcount(h.refcount_order)
        raw_l1 = (
            host.pread_exact(h.l1_table_offset, h.l1_size * 8, "L1 table") if h.l1_size else b""
        )
        self.l1 = tables.decode_table(raw_l1)
        self.reftable = self.refcount_table()
        self._blocks: dict[int, tables.U64] = {}
        self._l2_tables: dict[int, tables.U64] = {}
        self.file_end = -(-host.size // self.cluster_size) * self.cluster_size
        self._dirty_set = False
        self._metadata: set[int] | None = None

    # -- metadata areas (overlap checks) -------------------------------------------------
    def _metadata_clusters(self) -> set[int]:
        if self._metadata is None:
            cs = self.cluster_size
            h = self.header
            m = {0}
            m.update(_span(h.l1_table_offset, h.l1_size * 8, cs))
            m.update(_span(h.refcount_table_offset, h.refcount_table_clusters * cs, cs))
            m.update(int(o) // cs for o in self.reftable if o)
            m.update(int(o) // cs for o in (self.l1 & np.uint64(tables.OFFSET_MASK)) if o)
            if h.nb_snapshots:
                m.update(_span(h.snapshots_offset, 1, cs))
                for snap in self.snapshots():
                    m.update(_span(snap.l1_table_offset, snap.l1_size * 8, cs))
            if h.bitmaps is not None:
                m.update(
                    _span(h.bitmaps.bitmap_directory_offset, h.bitmaps.bitmap_directory_size, cs)
                )
            self._metadata = m
        return self._metadata

    def _check_overlap(self, offset: int, length: int, allowed: int | None, what: str) -> None:
        """Refuse to write ``what`` over metadata (except the cluster it replaces)."""
        meta = self._metadata_clusters()
        for cluster in _span(offset, length, self.cluster_size):
            if cluster in meta and cluster != allowed:
                self._signal_corruption(f"{what} write at {offset:#x} would overlap image metadata")

    def _signal_corruption(self, message: str) -> None:
        """Mark the image corrupt (as QEMU does) and raise."""
        with contextlib.suppress(QcowlibError, OSError):
            self._write_incompat(self.header.incompatible_features | hdr.INCOMPAT_CORRUPT)
        raise CorruptImage(message + "; image marked corrupt", file=self.filename)

    # -- low-level writes ----------------------------------------------------------------
    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            pwrite_all(self.host.fd, data, offset)
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
        end = offset + len(data)
        self.host.size = max(self.host.size, end)

    def _write_incompat(self, value: int) -> None:
        if self.header.version < 3:
            return
        self._pwrite(72, struct.pack(">Q", value))
        self.header = self.header.replace(incompatible_features=value)
        self.flush()

    def _mark_dirty(self) -> None:
        if not self._dirty_set and self.header.lazy_refcounts:
            self._write_incompat(self.header.incompatible_features | hdr.INCOMPAT_DIRTY)
            self._dirty_set = True

    # -- refcounts ---------------------------------------------------------------------
    def _block(self, index: int) -> tables.U64 | None:
        if index >= self.reftable.size:
            return None
        offset = int(self.reftable[index])
        if not offset:
            return None
        block = self._blocks.get(index)
        if block is None:
            if offset + self.cluster_size > self.host.size:
                raise CorruptImage(
                    f"refcount block {index} is past the end of the file", file=self.filename
                )
            block = self.refcount_block(offset).copy()
            self._blocks[index] = block
        return block

    def get_refcount(self, cluster: int) -> int:
        block = self._block(cluster // self.per_block)
        return 0 if block is None else int(block[cluster % self.per_block])

    def _write_block(self, index: int, lo: int = 0, hi: int | None = None) -> None:
        """Write refcount block ``index`` back, only the bytes of entries ``lo..hi``."""
        block = self._blocks[index]
        offset = int(self.reftable[index])
        self._check_overlap(
            offset, self.cluster_size, offset // self.cluster_size, "refcount block"
        )
        order = self.header.refcount_order
        if hi is None:
            self._pwrite(offset, rc.encode_block(block, order))
            return
        # Byte span of the changed entries (sub-byte widths round out to whole bytes,
        # whose other entries are encoded from the same in-memory block).
        bits = 1 << order
        first_byte = lo * bits // 8
        end_byte = -(-(hi * bits) // 8)
        per_byte = max(1, 8 // bits)
        entries = block[
            first_byte * 8 // bits : max(end_byte * 8 // bits, first_byte * 8 // bits + per_byte)
        ]
        self._pwrite(offset + first_byte, rc.encode_block(entries, order)[: end_byte - first_byte])

    def _update_refcounts(self, clusters: Iterable[int] | np.ndarray, delta: int) -> None:
        """Add ``delta`` to each cluster's refcount (once per occurrence), creating
        blocks as needed; block-at-a-time, each block written back once."""
        if not isinstance(clusters, np.ndarray):
            clusters = np.fromiter(clusters, dtype=np.int64)
        arr = np.sort(clusters.astype(np.int64))
        if arr.size == 0:
            return
        per = self.per_block
        if arr.size == 1:  # one cluster (most allocations): no grouping needed
            cluster = int(arr[0])
            index, i = divmod(cluster, per)
            block = self._block(index)
            if block is None:
                block = self._new_block(index)
            value = int(block[i]) + delta
            if value < 0 or value > self.max_refcount:
                self._signal_corruption(f"refcount of cluster {cluster} would become {value}")
            block[i] = value
            self._write_block(index, i, i + 1)
            return
        indexes = arr // per
        bounds = np.flatnonzero(np.diff(indexes)) + 1
        for part in np.split(arr, bounds):
            index = int(part[0]) // per
            block = self._block(index)
            if block is None:
                block = self._new_block(index)
            local, counts = np.unique(part % per, return_counts=True)
            step = counts.astype(np.uint64) * np.uint64(abs(delta))
            current = block[local]
            if delta >= 0:
                bad = current > np.uint64(self.max_refcount) - step
            else:
                bad = current < step
            if bad.any():
                at = int(np.flatnonzero(bad)[0])
                cluster = index * per + int(local[at])
                value = int(current[at]) + int(counts[at]) * delta
                self._signal_corruption(f"refcount of cluster {cluster} would become {value}")
            block[local] = current + step if delta >= 0 else current - step
            self._write_block(index, int(local[0]), int(local[-1]) + 1)

    def _new_block(self, index: int) -> tables.U64:
        """Create refcount block ``index`` at the end of the file (it may cover itself)."""
        if index >= self.reftable.size:
            self._grow_reftable(index + 1)
            existing = self._block(index)
            if existing is not None:
                return existing
        cs = self.cluster_size
        offset = self.file_end
        self.file_end += cs
        block = np.zeros(self.per_block, dtype=np.uint64)
        own = offset // cs
        self._blocks[index] = block
        if own // self.per_block == index:
            block[own % self.per_block] = 1
        self._pwrite(offset, rc.encode_block(block, self.header.refcount_order))
        if own // self.per_block != index:
            # Temporarily publish the block so the recursive update finds it.
            self._update_refcounts([own], 1)
        self.reftable[index] = offset
        self._metadata_clusters().add(own)
        self._pwrite(self.header.refcount_table_offset + 8 * index, struct.pack(">Q", offset))
        return block

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to a larger place at the end of the file.

        The new area holds the table and then the refcount blocks it needs beyond the
        old table's reach (they cover the area itself).  Order: blocks, refcounts of
        area clusters covered by old blocks, the table, header switch, then the old
        table's clusters are freed.
        """
        cs = self.cluster_size
        old = self.reftable
        start = self.file_end // cs
        cap = max(min_entries, old.size * 2)
        while True:
            t = -(-cap * 8 // cs)
            k = 0
            while True:
                blocks_total = -(-(start + t + k) // self.per_block)
                k_new = max(0, blocks_total - old.size)
                if k_new == k:
                    break
                k = k_new
            if blocks_total <= cap:
                break
            cap = blocks_total
        area_end = start + t + k
        table = np.zeros(t * cs // 8, dtype=np.uint64)
        table[: old.size] = old
        for j in range(k):
            index = old.size + j
            offset = (start + t + j) * cs
            block = np.zeros(self.per_block, dtype=np.uint64)
            lo = max(start, index * self.per_block)
            hi = min(area_end, (index + 1) * self.per_block)
            if lo < hi:
                block[lo - index * self.per_block : hi - index * self.per_block] = 1
            self._blocks[index] = block
            table[index] = offset
            self._pwrite(offset, rc.encode_block(block, self.header.refcount_order))
        self.file_end = area_end * cs
        self.reftable = table
        covered = [c for c in range(start, area_end) if c // self.per_block < old.size]
        if covered:
            self._update_refcounts(covered, 1)
        self._pwrite(start * cs, tables.encode_table(self.reftable))
        self.flush()
        old_offset = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        self._pwrite(48, struct.pack(">QI", start * cs, t))
        self.flush()
        self.header = self.header.replace(
            refcount_table_offset=start * cs, refcount_table_clusters=t
        )
        self._metadata = None
        self._update_refcounts(list(_span(old_offset, old_clusters * cs, cs)), -1)

    def alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters at the end of the file; returns the offset."""
        cs = self.cluster_size
        start = self.file_end // cs
        # Clusters past the end of the file may still carry refcounts (an allocation cut
        # short by a crash): never hand those out again.
        while (busy := self._last_used(start, n)) >= 0:
            start = busy + 1
        offset = start * cs
        self.file_end = offset + n * cs
        self._update_refcounts(np.arange(start, start + n, dtype=np.int64), 1)
        # Extend the file so the new clusters exist even before data lands in them.
        if self.file_end > self.host.size:
            try:
                os.ftruncate(self.host.fd, self.file_end)
            except OSError as exc:
                raise QcowlibIOError(
                    f"cannot extend image: {exc.strerror}", file=self.filename
                ) from None
            self.host.size = self.file_end
        return offset

    def _last_used(self, first: int, count: int) -> int:
        """The highest cluster of ``first .. first + count - 1`` with a refcount, or -1."""
        per = self.per_block
        end = first + count
        while end > first:
            index = (end - 1) // per
            lo = max(first, index * per)
            block = self._block(index)
            if block is not None:
                used = np.flatnonzero(block[lo - index * per : end - index * per])
                if used.size:
                    return lo + int(used[-1])
            end = lo
        return -1

    def _free(self, clusters: list[int] | np.ndarray) -> None:
        if len(clusters):
            self._update_refcounts(clusters, -1)

    # -- L1/L2 -----------------------------------------------------------------------
    def _l2_table(self, l1_index: int, *, allocate: bool) -> tables.U64 | None:
        """The raw L2 table (entries, interleaved with bitmaps for extended L2),
        copied on write when shared, allocated when missing and ``allocate``."""
        cs = self.cluster_size
        if l1_index >= self.l1.size:
            raise InvalidArgument("write beyond the L1 table")
        entry = int(self.l1[l1_index])
        offset = entry & tables.OFFSET_MASK
        if offset and l1_index in self._l2_tables and entry & tables.OFLAG_COPIED:
            return self._l2_tables[l1_index]
        if not offset:
            if not allocate:
                return None
            table = np.zeros(cs // 8, dtype=np.uint64)
            new = self.alloc_clusters(1)
            self._metadata_clusters().add(new // cs)
            self._pwrite(new, tables.encode_table(table))
            self._set_l1(l1_index, new | tables.OFLAG_COPIED)
            self._l2_tables[l1_index] = table
            return table
        table = tables.decode_table(self.host.pread_exact(offset, cs, f"L2 table {l1_index}"))
        if not entry & tables.OFLAG_COPIED and allocate:
            if self.get_refcount(offset // cs) != 1:
                # Shared with a snapshot: copy it, then drop our reference to the old one.
                new = self.alloc_clusters(1)
                self._metadata_clusters().add(new // cs)
                self._pwrite(new, tables.encode_table(table))
                self._set_l1(l1_index, new | tables.OFLAG_COPIED)
                self._free([offset // cs])
                self._metadata = None
            else:
                self._set_l1(l1_index, offset | tables.OFLAG_COPIED)
        self._l2_tables[l1_index] = table
        return table

    def _set_l1(self, index: int, entry: int) -> None:
        self.l1[index] = entry
        self.l2_offsets[index] = entry & tables.OFFSET_MASK
        off = self.header.l1_table_offset + 8 * index
        self._check_overlap(off, 8, off // self.cluster_size, "L1 entry")
        self._pwrite(off, struct.pack(">Q", entry))
        self._invalidate(index)

    def _set_l2(self, l1_index: int, i: int, entry: int, bitmap: int = 0) -> None:
        table = self._l2_tables[l1_index]
        cs = self.cluster_size
        base = int(self.l1[l1_index]) & tables.OFFSET_MASK
        if self.extended_l2:
            table[2 * i] = entry
            table[2 * i + 1] = bitmap
            raw = struct.pack(">QQ", entry, bitmap)
            pos = base + 16 * i
        else:
            table[i] = entry
            raw = struct.pack(">Q", entry)
            pos = base + 8 * i
        self._check_overlap(pos, len(raw), base // cs, "L2 entry")
        self._pwrite(pos, raw)
        self._invalidate(l1_index)

    def _invalidate(self, l1_index: int) -> None:
        with self._l2_lock:
            self._l2_cache.pop(l1_index, None)
        self._compressed_cache = None

    def _entry(self, table: tables.U64, i: int) -> tuple[int, int]:
        if self.extended_l2:
            return int(table[2 * i]), int(table[2 * i + 1])
        return int(table[i]), 0

    def _host_clusters_of(self, entry: int) -> list[int]:
        """Host clusters an L2 entry holds a reference to."""
        return [int(c) for c in self._referenced_clusters(np.array([entry], dtype=np.uint64))]

    def _referenced_clusters(self, entries: np.ndarray) -> np.ndarray:
        """Host clusters that L2 ``entries`` hold references to (one per reference)."""
        cs = self.cluster_size
        compressed = (entries & np.uint64(tables.OFLAG_COMPRESSED)) != 0
        plain = entries[~compressed] & np.uint64(tables.OFFSET_MASK)
        out = [(plain[plain != 0] // np.uint64(cs)).astype(np.int64)]
        if compressed.any():
            layout = tables.CompressedLayout(self.cluster_bits)
            off, length = layout.decode(entries[compressed])
            first = (off // np.uint64(cs)).astype(np.int64)
            span = ((off + length - np.uint64(1)) // np.uint64(cs)).astype(np.int64) - first + 1
            starts = np.repeat(np.cumsum(span) - span, span)
            out.append(np.repeat(first, span) + np.arange(int(span.sum())) - starts)
        return np.concatenate(out)

    # -- guest writes -----------------------------------------------------------------
    def _guest_cluster(self, cluster: int) -> bytearray:
        """The current guest content of a whole cluster (backing included)."""
        cs = self.cluster_size
        start = cluster * cs
        buf = bytearray(cs)
        n = min(cs, self.virtual_size - start)
        self.read_into(start, memoryview(buf)[:n])
        return buf

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes at ``offset`` (allocating, copying on write as needed)."""
        view = memoryview(data).cast("B")
        self._range(offset, len(view))
        if not view:
            return
        self._mark_dirty()
        cs = self.cluster_size
        pos = offset
        end = offset + len(view)
        while pos < end:
            cluster = pos // cs
            if pos % cs == 0 and end - pos >= 2 * cs and not self.extended_l2:
                done = self._write_new_clusters(cluster, view[pos - offset :])
                if done:
                    pos += done * cs
                    continue
            c_end = min(end, (cluster + 1) * cs)
            self._write_in_cluster(cluster, pos - cluster * cs, view[pos - offset : c_end - offset])
            pos = c_end

    def _write_new_clusters(self, cluster: int, data: memoryview) -> int:
        """Write whole clusters from ``cluster`` on that this image does not hold yet
        (unallocated or zero without a host cluster) in one allocation, one data write
        and one L2 write; returns how many were written (0: none could be)."""
        cs = self.cluster_size
        l1_index, i = divmod(cluster, self.l2_entries)
        table = self._l2_table(l1_index, allocate=True)
        assert table is not None
        limit = min(len(data) // cs, self.l2_entries - i)
        held = table[i : i + limit] & np.uint64(tables.OFFSET_MASK | tables.OFLAG_COMPRESSED)
        taken = np.flatnonzero(held)
        n = int(taken[0]) if taken.size else limit
        if n < 2:
            return 0
        target = self.alloc_clusters(n)
        self._check_overlap(target, n * cs, None, "data")
        self._pwrite(target, data[: n * cs])
        hosts = np.uint64(target) + np.arange(n, dtype=np.uint64) * np.uint64(cs)
        table[i : i + n] = hosts | np.uint64(tables.OFLAG_COPIED)
        base = int(self.l1[l1_index]) & tables.OFFSET_MASK
        self._check_overlap(base + 8 * i, 8 * n, base // cs, "L2 entries")
        self._pwrite(base + 8 * i, tables.encode_table(table[i : i + n]))
        self._invalidate(l1_index)
        return n

    def _write_in_cluster(self, cluster: int, within: int, data: memoryview) -> None:
        cs = self.cluster_size
        l1_index, i = divmod(cluster, self.l2_entries)
        table = self._l2_table(l1_index, allocate=True)
        assert table is not None
        entry, bitmap = self._entry(table, i)
        host = entry & tables.OFFSET_MASK
        compressed = bool(entry & tables.OFLAG_COMPRESSED)
        in_place = (
            host
            and not compressed
            and (entry & tables.OFLAG_COPIED or self.get_refcount(host // cs) == 1)
        )
        if self.extended_l2:
            self._write_extended(l1_index, i, cluster, within, data, entry, bitmap, bool(in_place))
            return
        if in_place and not entry & tables.OFLAG_ZERO:
            self._check_overlap(host + within, len(data), None, "data")
            self._pwrite(host + within, data)
            if not entry & tables.OFLAG_COPIED:
                self._set_l2(l1_index, i, host | tables.OFLAG_COPIED)
            return
        # Build the whole new cluster: old content (zeros for a zero cluster) + new bytes.
        if len(data) == cs:
            content: bytes | bytearray | memoryview = data
        else:
            buf = bytearray(cs) if entry & tables.OFLAG_ZERO else self._guest_cluster(cluster)
            buf[within : within + len(data)] = data
            content = buf
        if in_place:  # an allocated zero cluster we own: reuse it
            target = host
        else:
            target = self.alloc_clusters(1)
        self._check_overlap(target, cs, None, "data")
        self._pwrite(target, content)
        self._set_l2(l1_index, i, target | tables.OFLAG_COPIED)
        if not in_place:
            self._free(self._host_clusters_of(entry))

    def _write_extended(
        self,
        l1_index: int,
        i: int,
        cluster: int,
        within: int,
        data: memoryview,
        entry: int,
        bitmap: int,
        in_place: bool,
    ) -> None:
        """Subcluster-granular write (extended L2): only touched subclusters change."""
        cs = self.cluster_size
        sc = cs // tables.SUBCLUSTERS
        first, last = within // sc, (within + len(data) - 1) // sc
        lo, hi = first * sc, (last + 1) * sc
        host = entry & tables.OFFSET_MASK
        compressed = bool(entry & tables.OFLAG_COMPRESSED)
        if in_place:
            target = host
            old_content = None
        else:
            target = self.alloc_clusters(1)
            old_content = self._guest_cluster(cluster) if (host or compressed) else None
        span = bytearray(hi - lo)
        if lo < within or within + len(data) < hi:
            # partial subclusters: current guest content of [lo, hi)
            self.read_into(
                cluster * cs + lo,
                memoryview(span)[: min(hi, self.virtual_size - cluster * cs) - lo],
            )
        span[within - lo : within - lo + len(data)] = data
        alloc_mask = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
        if old_content is not None:
            # the old cluster was allocated or compressed and is being replaced: carry all
            old_content[lo:hi] = span
            self._check_overlap(target, cs, None, "data")
            self._pwrite(target, old_content)
            new_bitmap = 0xFFFF_FFFF
        else:
            self._check_overlap(target + lo, len(span), None, "data")
            self._pwrite(target + lo, span)
            old_alloc = bitmap & 0xFFFF_FFFF if in_place else 0
            old_zero = (bitmap >> 32) & ~alloc_mask & 0xFFFF_FFFF
            new_bitmap = (old_alloc | alloc_mask) | (old_zero << 32)
            new_bitmap &= ~((old_alloc | alloc_mask) << 32)
        self._set_l2(l1_index, i, target | tables.OFLAG_COPIED, new_bitmap)
        if not in_place:
            self._free(self._host_clusters_of(entry))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros (zero clusters where whole)."""
        self._range(offset, length)
        self._mark_dirty()
        cs = self.cluster_size
        end = offset + length
        pos = offset
        while pos < end:
            cluster = pos // cs
            c_start, c_end = cluster * cs, min((cluster + 1) * cs, self.virtual_size)
            stop = min(end, c_end)
            whole = pos == c_start and stop == c_end
            if whole and self.header.version >= 3 and not self.extended_l2:
                self._zero_cluster(cluster)
            elif self.extended_l2 and self._zero_subclusters(
                cluster, pos - c_start, stop - c_start
            ):
                pass
            else:
                # partial cluster (or v2): only writing zeros is correct
                if self.backing is None and self._reads_zero(pos, stop - pos):
                    pos = stop
                    continue
                self.write(pos, bytes(stop - pos))
            pos = stop

    def _reads_zero(self, offset: int, length: int) -> bool:
        return all(e.reads_zero for e in self.layer_extents(offset, length))

    def _zero_cluster(self, cluster: int, *, keep_allocation: bool = True) -> None:
        l1_index, i = divmod(cluster, self.l2_entries)
        table = self._l2_table(l1_index, allocate=True)
        assert table is not None
        entry, _ = self._entry(table, i)
        host = entry & tables.OFFSET_MASK
        own = (
            keep_allocation
            and host
            and not entry & tables.OFLAG_COMPRESSED
            and self.get_refcount(host // self.cluster_size) == 1
        )
        if own:
            self._set_l2(l1_index, i, host | tables.OFLAG_COPIED | tables.OFLAG_ZERO)
        else:
            self._set_l2(l1_index, i, tables.OFLAG_ZERO)
            self._free(self._host_clusters_of(entry))

    def _zero_subclusters(self, cluster: int, lo: int, hi: int) -> bool:
        """Extended L2: mark whole subclusters of ``[lo, hi)`` zero; False if unaligned."""
        sc = self.cluster_size // tables.SUBCLUSTERS
        if lo % sc or (hi % sc and cluster * self.cluster_size + hi != self.virtual_size):
            return False
        first, last = lo // sc, -(-hi // sc) - 1
        l1_index, i = divmod(cluster, self.l2_entries)
        table = self._l2_table(l1_index, allocate=True)
        assert table is not None
        entry, bitmap = self._entry(table, i)
        if entry & tables.OFLAG_COMPRESSED:
            return False
        mask = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
        host = entry & tables.OFFSET_MASK
        if host and self.get_refcount(host // self.cluster_size) != 1:
            return False
        new_bitmap = (bitmap & 0xFFFF_FFFF & ~mask) | (((bitmap >> 32) | mask) << 32)
        self._set_l2(l1_index, i, entry, new_bitmap)
        return True

    def discard(self, offset: int, length: int) -> None:
        """Guest discard: whole clusters in the range are freed and read as zeros
        afterwards on v3 images (QEMU's ``discard_in_l2_slice``); partial ones are
        left alone."""
        self._range(offset, length)
        self._mark_dirty()
        cs = self.cluster_size
        first = -(-offset // cs)
        end = offset + length
        last = end // cs if end != self.virtual_size else -(-end // cs)
        for cluster in range(first, last):
            l1_index, i = divmod(cluster, self.l2_entries)
            if self.l2_offsets[l1_index] == 0 and self.backing is None:
                continue  # unallocated without a backing file already reads as zeros
            table = self._l2_table(l1_index, allocate=True)
            assert table is not None
            entry, _ = self._entry(table, i)
            allocated = bool(entry & (tables.OFFSET_MASK | tables.OFLAG_COMPRESSED))
            if not allocated and self.backing is None:
                continue
            if self.extended_l2:
                self._set_l2(l1_index, i, 0, 0xFFFF_FFFF << 32)
            elif self.header.version >= 3:
                self._set_l2(l1_index, i, tables.OFLAG_ZERO)
            else:
                self._set_l2(l1_index, i, 0)
            self._free(self._host_clusters_of(entry))

    def make_empty(self) -> None:
        """Drop every cluster of this layer so the backing file shows through
        (``qemu-img commit`` without ``-d``; QEMU's ``qcow2_make_empty``)."""
        self._mark_dirty()
        cs = self.cluster_size
        for l1_index in range(self.l1.size):
            if not int(self.l1[l1_index]) & tables.OFFSET_MASK:
                continue
            table = self._l2_table(l1_index, allocate=True)
            assert table is not None
            entries = table[0::2] if self.extended_l2 else table
            refs: list[int] = []
            for i in np.flatnonzero(entries).tolist():
                refs.extend(self._host_clusters_of(int(entries[i])))
            if self.extended_l2:
                refs_bitmaps = np.flatnonzero(table[1::2])
                if not refs and not refs_bitmaps.size:
                    continue
            elif not refs and not np.any(entries):
                continue
            base = int(self.l1[l1_index]) & tables.OFFSET_MASK
            table[:] = 0
            self._check_overlap(base, cs, base // cs, "L2 table")
            self._pwrite(base, tables.encode_table(table))
            self._invalidate(l1_index)
            self._free(refs)

    # -- header changes ----------------------------------------------------------------
    def rewrite_header(self, new: hdr.Header) -> None:
        """Write a changed header (it must fit in the first cluster, as QEMU requires)."""
        raw = hdr.build_header(new)
        if len(raw) > self.cluster_size:
            raise InvalidArgument("header, extensions and backing name do not fit in a cluster")
        self._pwrite(
            0, raw.ljust(min(self.cluster_size, max(len(raw), 4096)), b"\0")[: self.cluster_size]
        )
        self.flush()
        self.header = new

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Record a new backing file name and format (``rebase -u``)."""
        h = self.header
        exts = [e for e in h.extensions if e.type != hdr.EXT_BACKING_FORMAT]
        if name and fmt:
            exts.insert(0, hdr.extension(hdr.EXT_BACKING_FORMAT, fmt.encode()))
        header_len = h.header_length
        ext_end = header_len + sum(8 + -(-len(e.data) // 8) * 8 for e in exts) + 8
        raw_name = name.encode() if name else b""
        if len(raw_name) > hdr.MAX_BACKING_FILE_NAME:
            raise InvalidArgument("backing file name is too long")
        new = h.replace(
            backing_file=name or None,
            backing_format=fmt if name else None,
            backing_file_offset=ext_end if name else 0,
            backing_file_size=len(raw_name),
            extensions=tuple(exts),
        )
        self.rewrite_header(new)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Change the virtual size; shrinking frees the clusters past the new end."""
        if size % 512:
            raise InvalidArgument("The new size must be a multiple of 512")
        if size < self.virtual_size and not shrink:
            raise InvalidArgument("Use the --shrink option to perform a shrink operation.")
        if size < self.virtual_size and self.header.nb_snapshots:
            raise UnsupportedFeature("Can't resize an image which has snapshots")
        cs = self.cluster_size
        need = hdr.l1_entries_needed(size, self.cluster_bits, self.header.l2_entry_size)
        if size < self.virtual_size:
            first = -(-size // cs)
            if size % cs:
                # zero the tail of the last partial cluster so a later grow reads zeros
                end_partial = min(first * cs, self.virtual_size)
                self.write_zeroes(size, end_partial - size)
            self._unmap_tail(first)
            for l1_index in range(need, self.l1.size):
                entry = int(self.l1[l1_index])
                if entry & tables.OFFSET_MASK:
                    self._set_l1(l1_index, 0)
                    self._l2_tables.pop(l1_index, None)
                    self._free([(entry & tables.OFFSET_MASK) // cs])
            self._metadata = None
        elif need > self.l1.size:
            self._grow_l1(need)
        self._pwrite(24, struct.pack(">Q", size))
        self.flush()
        shrunk = size < self.virtual_size
        self.header = self.header.replace(size=size)
        self.virtual_size = size
        self._l2_cache.clear()
        if shrunk:
            self._truncate_unused_tail()

    def _unmap_tail(self, first: int) -> None:
        """Unmap guest clusters ``first`` onwards, one L2 table at a time."""
        per = self.l2_entries
        last = -(-self.virtual_size // self.cluster_size)
        width = 2 if self.extended_l2 else 1
        for l1_index in range(first // per, min(self.l1.size, -(-last // per))):
            if self._l2_table(l1_index, allocate=False) is None:
                continue
            table = self._l2_table(l1_index, allocate=True)  # copies a shared table
            assert table is not None
            lo, hi = max(first - l1_index * per, 0), min(last - l1_index * per, per)
            if not table[lo * width : hi * width].any():
                continue
            freed = self._referenced_clusters(table[lo * width : hi * width : width])
            table[lo * width : hi * width] = 0
            base = int(self.l1[l1_index]) & tables.OFFSET_MASK
            raw = tables.encode_table(table[lo * width : hi * width])
            pos = base + lo * width * 8
            self._check_overlap(pos, len(raw), base // self.cluster_size, "L2 table")
            self._pwrite(pos, raw)
            self._invalidate(l1_index)
            self._free(freed)

    def _truncate_unused_tail(self) -> None:
        """Cut the file after its last cluster in use, as QEMU does after a shrink."""
        cs = self.cluster_size
        last = -1
        # From the last refcount block backwards: usually only the last one is read.
        for index in reversed(np.flatnonzero(self.reftable).tolist()):
            block = self._block(index)
            used = np.flatnonzero(block) if block is not None else np.zeros(0, dtype=np.int64)
            if used.size:
                last = index * self.per_block + int(used[-1])
                break
        end = (last + 1) * cs
        if 0 < end < self.host.size:
            try:
                os.ftruncate(self.host.fd, end)
            except OSError as exc:
                log.warning("%s: cannot truncate the tail: %s", self.filename, exc.strerror)
                return
            self.host.size = end
            self.file_end = end

    def _grow_l1(self, entries: int) -> None:
        cs = self.cluster_size
        old_offset, old_size = self.header.l1_table_offset, self.header.l1_size
        if entries * 8 > hdr.MAX_L1_SIZE_BYTES:
            raise InvalidArgument("new size needs an L1 table larger than the 32 MiB cap")
        n = -(-entries * 8 // cs)
        new_offset = self.alloc_clusters(n)
        l1 = np.zeros(entries, dtype=np.uint64)
        l1[: self.l1.size] = self.l1
        self._pwrite(new_offset, tables.encode_table(l1).ljust(n * cs, b"\0"))
        self.flush()
        self._pwrite(36, struct.pack(">IQ", entries, new_offset))
        self.flush()
        self.header = self.header.replace(l1_size=entries, l1_table_offset=new_offset)
        self.l1 = l1
        offsets = np.zeros(entries, dtype=np.uint64)
        offsets[: self.l2_offsets.size] = self.l2_offsets
        self.l2_offsets = offsets
        self._metadata = None
        if old_size:
            self._free(list(_span(old_offset, old_size * 8, cs)))

    # -- closing ---------------------------------------------------------------------
    def flush(self) -> None:
        """Make everything written durable."""
        try:
            os.fsync(self.host.fd)
        except OSError as exc:
            raise QcowlibIOError(f"flush failed: {exc.strerror}", file=self.filename) from None

    def _close_layer(self) -> None:
        if self.host.fd >= 0:
            try:
                self.flush()
                if self._dirty_set:
                    self._write_incompat(self.header.incompatible_features & ~hdr.INCOMPAT_DIRTY)
            finally:
                super()._close_layer()


def _span(offset: int, length: int, cs: int) -> range:
    if length <= 0:
        return range(0)
    return range(offset // cs, (offset + length - 1) // cs + 1)


def open_rw_layer(path: str) -> Qcow2RWDisk:
    """Open a qcow2 image for writing, without its backing chain (see
    :func:`qcowlib.formats.opener.open_rw`, which attaches it).

    Raises :class:`ImageLocked` when another process has it open for writing,
    :class:`CorruptImage` for images marked corrupt or dirty, and the usual open errors.
    """
    from qcowlib.formats import detect

    host = HostFile(path, writable=True)
    try:
        head = host.pread(0, min(host.size, detect.PROBE_HEAD_SIZE))
        tail = host.pread(max(0, host.size - 512), min(512, host.size))
        if detect.probe(head, tail, host.size).format != "qcow2":
            raise InvalidArgument(f"{path} is not a qcow2 image", file=path)
        take_write_locks(host.fd, path)
        return Qcow2RWDisk(host, path, read_header(host))
    except BaseException:
        host.close()
        raise


__all__ = ["ExtentKind", "Qcow2RWDisk", "open_rw_layer", "take_write_locks"]
