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

Overlap checks, refcounts, L1/L2 updates and the dirty bit are
:class:`~qcowlib.formats.qcow2.metadata_write.Qcow2MetadataWriter`'s (the base class);
this module writes guest data (allocating and copying on write), zeroes, discards,
resizes and changes the header.
"""

from __future__ import annotations

import numpy as np

from qcowlib._log import get_logger
from qcowlib.core.disk import ExtentKind
from qcowlib.core.hostfile import HostFile
from qcowlib.core.locks import take_write_locks
from qcowlib.errors import InvalidArgument, QcowlibIOError, UnsupportedFeature
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import tables
from qcowlib.formats.qcow2.hostio import write_fields
from qcowlib.formats.qcow2.metadata_write import Qcow2MetadataWriter
from qcowlib.formats.qcow2.probe import probe as probe_qcow2
from qcowlib.formats.qcow2.reader import read_header

log = get_logger(__name__)


class Qcow2RWDisk(Qcow2MetadataWriter):
    """A qcow2 image open for reading and writing.  Use :func:`open_rw`."""

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
        self._forget_l2()
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
