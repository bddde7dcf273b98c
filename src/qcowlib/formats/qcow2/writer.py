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
* QEMU's advisory locks are taken on the image (:mod:`qcowlib.core.locks`), so an
  image a running VM or qemu-io holds for writing is refused, and they cannot open it
  for writing while we do.

Refcounts and allocation are :class:`~qcowlib.formats.qcow2.allocator.Allocator`'s, over
the refcount model ``check`` uses too; the overlap checks are
:class:`~qcowlib.formats.qcow2.overlap.MetadataAreas`, as in ``check``'s repairs.
"""

from __future__ import annotations

import contextlib
import struct
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import numpy.typing as npt

from qcowlib._log import get_logger
from qcowlib.core.disk import ExtentKind
from qcowlib.core.hostfile import HostFile
from qcowlib.core.locks import take_write_locks
from qcowlib.errors import (
    CorruptImage,
    InvalidArgument,
    QcowlibError,
    QcowlibIOError,
    UnsupportedFeature,
)
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import tables
from qcowlib.formats.qcow2.allocator import Allocator, span
from qcowlib.formats.qcow2.hostio import with_backing, write_fields, write_header
from qcowlib.formats.qcow2.overlap import OL_NAMES, MetadataAreas
from qcowlib.formats.qcow2.probe import probe as probe_qcow2
from qcowlib.formats.qcow2.reader import Qcow2Disk, read_header
from qcowlib.formats.qcow2.snapshot import snapshot_table_size

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.bitmap_rw import WriteTracker

log = get_logger(__name__)


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
        raw_l1 = (
            host.pread_exact(h.l1_table_offset, h.l1_size * 8, "L1 table") if h.l1_size else b""
        )
        self.l1 = tables.decode_table(raw_l1)
        self.allocator = Allocator(self, host, self.refcount_table())
        self._l2_tables: dict[int, tables.U64] = {}
        self._dirty_set = False
        self._tracker: WriteTracker | None = None
        self._metadata: MetadataAreas | None = None

    # -- metadata areas (overlap checks) -------------------------------------------------
    def _areas(self) -> MetadataAreas:
        if self._metadata is None:
            cs = self.cluster_size
            h = self.header
            snaps = self.snapshots() if h.nb_snapshots else []
            bm = h.bitmaps
            self._metadata = MetadataAreas(
                cluster_size=cs,
                l1=(h.l1_table_offset, h.l1_size * 8),
                refcount_table=(h.refcount_table_offset, h.refcount_table_clusters * cs),
                l1_table=self.l1,
                reftable_entries=self.allocator.reftable,
                snapshot_table=(h.snapshots_offset, snapshot_table_size(snaps)),
                inactive_l1=[(sn.l1_table_offset, sn.l1_size * 8) for sn in snaps],
                bitmap_directory=(
                    (bm.bitmap_directory_offset, bm.bitmap_directory_size) if bm else (0, 0)
                ),
            )
        return self._metadata

    def metadata_changed(self) -> None:
        """A table moved or a new one appeared: recompute the areas on the next check."""
        self._metadata = None

    def tables_changed(self) -> None:
        """L1/L2 tables, flags or the snapshot table changed behind the write path
        (snapshot and amend operations): forget everything read from them."""
        self._l2_tables.clear()
        with self._l2_lock:
            self._l2_cache.clear()
        self._compressed_cache = None
        self._snapshots = None
        self._bitmaps = None
        self._metadata = None

    def first_overlap(self, offset: int, length: int, ign: int) -> int:
        """The ``QCOW2_OL_*`` area a write would touch, leaving out the areas ``ign``."""
        return self._areas().first_overlap(offset, length, ign=ign)

    def check_overlap(self, offset: int, length: int, allowed: int | None, what: str) -> None:
        """Refuse to write ``what`` over metadata (except the cluster ``allowed`` it
        replaces), as QEMU's overlap checks do."""
        hit = self._areas().first_overlap(offset, length, allow=allowed)
        if hit:
            self.signal_corruption(
                f"{what} write at {offset:#x} would overlap image metadata ({OL_NAMES[hit]})"
            )

    def signal_corruption(self, message: str) -> NoReturn:
        """Mark the image corrupt (as QEMU does) and raise."""
        with contextlib.suppress(QcowlibError, OSError):
            self._write_incompat(self.header.incompatible_features | hdr.INCOMPAT_CORRUPT)
        raise CorruptImage(message + "; image marked corrupt", file=self.filename)

    # -- low-level writes ----------------------------------------------------------------
    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.host.pwrite(offset, data)

    def _write_incompat(self, value: int) -> None:
        if self.header.version < 3:
            return
        write_fields(self.host, incompatible_features=value)
        self.header = self.header.replace(incompatible_features=value)
        self.flush()

    def _mark_dirty(self, offset: int = 0, length: int | None = None) -> None:
        """Before a guest change of ``[offset, offset + length)`` (None: to the end):
        enabled persistent bitmaps record it, lazy refcounts set the dirty bit."""
        if self._tracker is None:
            from qcowlib.formats.qcow2.bitmap_rw import WriteTracker

            self._tracker = WriteTracker.start(self)
        self._tracker.note(offset, self.virtual_size - offset if length is None else length)
        if not self._dirty_set and self.header.lazy_refcounts:
            self._write_incompat(self.header.incompatible_features | hdr.INCOMPAT_DIRTY)
            self._dirty_set = True

    # -- refcounts ---------------------------------------------------------------------
    def alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters at the end of the file; returns the offset."""
        return self.allocator.alloc(n)

    def _free(self, clusters: list[int] | np.ndarray) -> None:
        self.allocator.free(clusters)

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
            self._pwrite(new, tables.encode_table(table))
            self._set_l1(l1_index, new | tables.OFLAG_COPIED)
            self._l2_tables[l1_index] = table
            return table
        table = tables.decode_table(self.host.pread_exact(offset, cs, f"L2 table {l1_index}"))
        if not entry & tables.OFLAG_COPIED and allocate:
            if self.allocator.get_refcount(offset // cs) != 1:
                # Shared with a snapshot: copy it, then drop our reference to the old one.
                new = self.alloc_clusters(1)
                self._pwrite(new, tables.encode_table(table))
                self._set_l1(l1_index, new | tables.OFLAG_COPIED)
                self._free([offset // cs])
            else:
                self._set_l1(l1_index, offset | tables.OFLAG_COPIED)
        self._l2_tables[l1_index] = table
        return table

    def _set_l1(self, index: int, entry: int) -> None:
        off = self.header.l1_table_offset + 8 * index
        self.check_overlap(off, 8, off // self.cluster_size, "L1 entry")
        if (int(self.l1[index]) ^ entry) & tables.OFFSET_MASK:
            self._metadata = None  # the active L2 tables changed
        self.l1[index] = entry
        self.l2_offsets[index] = entry & tables.OFFSET_MASK
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
        self.check_overlap(pos, len(raw), base // cs, "L2 entry")
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

    def _referenced_clusters(self, entries: tables.U64) -> npt.NDArray[np.int64]:
        """Host clusters that L2 ``entries`` hold references to (one per reference)."""
        return tables.referenced_clusters(entries, self.cluster_bits)

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
        self._mark_dirty(offset, len(view))
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
        self.check_overlap(target, n * cs, None, "data")
        self._pwrite(target, data[: n * cs])
        hosts = np.uint64(target) + np.arange(n, dtype=np.uint64) * np.uint64(cs)
        table[i : i + n] = hosts | np.uint64(tables.OFLAG_COPIED)
        base = int(self.l1[l1_index]) & tables.OFFSET_MASK
        self.check_overlap(base + 8 * i, 8 * n, base // cs, "L2 entries")
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
            and (entry & tables.OFLAG_COPIED or self.allocator.get_refcount(host // cs) == 1)
        )
        if self.extended_l2:
            self._write_extended(l1_index, i, cluster, within, data, entry, bitmap, bool(in_place))
            return
        if in_place and not entry & tables.OFLAG_ZERO:
            self.check_overlap(host + within, len(data), None, "data")
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
        self.check_overlap(target, cs, None, "data")
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
            self.check_overlap(target, cs, None, "data")
            self._pwrite(target, old_content)
            new_bitmap = 0xFFFF_FFFF
        else:
            self.check_overlap(target + lo, len(span), None, "data")
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
        self._mark_dirty(offset, length)
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
            and self.allocator.get_refcount(host // self.cluster_size) == 1
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
        if host and self.allocator.get_refcount(host // self.cluster_size) != 1:
            return False
        new_bitmap = (bitmap & 0xFFFF_FFFF & ~mask) | (((bitmap >> 32) | mask) << 32)
        self._set_l2(l1_index, i, entry, new_bitmap)
        return True

    def discard(self, offset: int, length: int) -> None:
        """Guest discard: whole clusters in the range are freed and read as zeros
        afterwards on v3 images (QEMU's ``discard_in_l2_slice``); partial ones are
        left alone."""
        self._range(offset, length)
        self._mark_dirty(offset, length)
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
            self.check_overlap(base, cs, base // cs, "L2 table")
            self._pwrite(base, tables.encode_table(table))
            self._invalidate(l1_index)
            self._free(refs)

    # -- header changes ----------------------------------------------------------------
    def rewrite_header(self, new: hdr.Header) -> None:
        """Write a changed header (it must fit in the first cluster, as QEMU requires)."""
        write_header(self.host, new)
        self.flush()
        self.header = new

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Record a new backing file name and format (``rebase -u``)."""
        self.rewrite_header(with_backing(self.header, name, fmt))

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
        elif need > self.l1.size:
            self.grow_l1(need)
        write_fields(self.host, size=size)
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
            self.check_overlap(pos, len(raw), base // self.cluster_size, "L2 table")
            self._pwrite(pos, raw)
            self._invalidate(l1_index)
            self._free(freed)

    def _truncate_unused_tail(self) -> None:
        """Cut the file after its last cluster in use, as QEMU does after a shrink."""
        end = (self.allocator.last_used() + 1) * self.cluster_size
        if 0 < end < self.host.size:
            try:
                self.host.truncate(end)
            except QcowlibIOError as exc:
                log.warning("%s: cannot truncate the tail: %s", self.filename, exc.message)
                return
            self.allocator.file_end = end

    def grow_l1(self, entries: int) -> None:
        """Move the active L1 table to a larger place (QEMU's qcow2_grow_l1_table)."""
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
        write_fields(self.host, l1_size=entries, l1_table_offset=new_offset)
        self.flush()
        self.header = self.header.replace(l1_size=entries, l1_table_offset=new_offset)
        self.l1 = l1
        offsets = np.zeros(entries, dtype=np.uint64)
        offsets[: self.l2_offsets.size] = self.l2_offsets
        self.l2_offsets = offsets
        self._metadata = None
        if old_size:
            self._free(list(span(old_offset, old_size * 8, cs)))

    # -- closing ---------------------------------------------------------------------
    def flush(self) -> None:
        """Make everything written durable."""
        self.host.sync()

    def _close_layer(self) -> None:
        if self.host.fd >= 0:
            try:
                if self._tracker is not None:
                    self._tracker.finish(self)
                self.flush()
                if self._dirty_set:
                    self._write_incompat(self.header.incompatible_features & ~hdr.INCOMPAT_DIRTY)
            finally:
                super()._close_layer()


def open_rw_layer(path: str) -> Qcow2RWDisk:
    """Open a qcow2 image for writing, without its backing chain (see
    :func:`qcowlib.formats.opener.open_rw`, which attaches it).

    Raises :class:`ImageLocked` when another process has it open for writing,
    :class:`CorruptImage` for images marked corrupt or dirty, and the usual open errors.
    """
    host = HostFile(path, writable=True)
    try:
        # The qcow2 probe is asked first of all: what it claims, probing calls qcow2.
        if host.size <= 0 or probe_qcow2(host.pread(0, min(host.size, 8)), b"", host.size) is None:
            raise InvalidArgument(f"{path} is not a qcow2 image", file=path)
        take_write_locks(host.fd, path)
        return Qcow2RWDisk(host, path, read_header(host))
    except BaseException:
        host.close()
        raise


__all__ = ["ExtentKind", "Qcow2RWDisk", "open_rw_layer", "take_write_locks"]
