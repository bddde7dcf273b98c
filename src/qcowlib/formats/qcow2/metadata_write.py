"""The metadata side of writing a qcow2 image in place: overlap checks, refcounts and
allocation, L1/L2 updates (a shared L2 table copied before it changes), L1 growth, the
dirty and corrupt bits, and closing cleanly.

:class:`Qcow2MetadataWriter` is the base of
:class:`~qcowlib.formats.qcow2.writer.Qcow2RWDisk`, which writes guest data through it
(the rules both keep are listed there).  Refcounts and allocation are
:class:`~qcowlib.formats.qcow2.allocator.Allocator`'s, over the refcount model ``check``
uses too; the overlap checks are :class:`~qcowlib.formats.qcow2.overlap.MetadataAreas`,
as in ``check``'s repairs.
"""

from __future__ import annotations

import contextlib
import struct
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import numpy.typing as npt

from qcowlib._log import get_logger
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, InvalidArgument, QcowlibError, UnsupportedFeature
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import tables
from qcowlib.formats.qcow2.allocator import Allocator, span
from qcowlib.formats.qcow2.hostio import with_backing, write_fields, write_header
from qcowlib.formats.qcow2.overlap import OL_NAMES, MetadataAreas
from qcowlib.formats.qcow2.reader import Qcow2Disk
from qcowlib.formats.qcow2.snapshot import snapshot_table_size

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.bitmap_rw import WriteTracker

__all__ = ["Qcow2MetadataWriter"]

log = get_logger(__name__)


class Qcow2MetadataWriter(Qcow2Disk):
    """A qcow2 image open for writing its metadata; guest writes are
    :class:`~qcowlib.formats.qcow2.writer.Qcow2RWDisk`'s."""

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
        self._forget_l2()
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
        self._forget_l2(l1_index)
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

    # -- header changes ----------------------------------------------------------------
    def rewrite_header(self, new: hdr.Header) -> None:
        """Write a changed header (it must fit in the first cluster, as QEMU requires)."""
        write_header(self.host, new)
        self.flush()
        self.header = new

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Record a new backing file name and format (``rebase -u``)."""
        self.rewrite_header(with_backing(self.header, name, fmt))

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
