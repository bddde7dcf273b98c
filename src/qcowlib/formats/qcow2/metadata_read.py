"""Reading a qcow2 image's metadata beyond the L1/L2 map: the snapshot table, the bitmap
directory, refcount tables and blocks, and QEMU's metadata-preallocation detection.

A mixin of :class:`~qcowlib.formats.qcow2.reader.Qcow2Disk` (and so of the in-place
writer): check, info, the writer and repair read these through the disk they opened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from qcowlib._log import get_logger
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, QcowlibError
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import reader_plain
from qcowlib.formats.qcow2.entries import entries_per_block

if TYPE_CHECKING:
    from qcowlib.formats.qcow2 import tables
    from qcowlib.formats.qcow2.bitmap import BitmapEntry
    from qcowlib.formats.qcow2.snapshot import Snapshot

log = get_logger(__name__)


class Qcow2Metadata:
    """Snapshot table, bitmap directory and refcount structures of one qcow2 file."""

    host: HostFile
    header: hdr.Header
    filename: str
    cluster_size: int
    cluster_bits: int
    _snapshots: list[Snapshot] | None
    _bitmaps: list[BitmapEntry] | None
    _metadata_prealloc: bool | None

    # -- metadata -----------------------------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots (read on first use)."""
        if self._snapshots is None:
            h = self.header
            if h.nb_snapshots == 0:
                self._snapshots = []
            else:
                from qcowlib.formats.qcow2.snapshot import (
                    MAX_SNAPSHOTS_SIZE,
                    parse_snapshot_table,
                )

                size = min(self.host.size - h.snapshots_offset, MAX_SNAPSHOTS_SIZE)
                raw = self.host.pread(h.snapshots_offset, max(0, size))
                try:
                    self._snapshots = parse_snapshot_table(raw, h.nb_snapshots, h.snapshots_offset)
                except QcowlibError as exc:
                    raise exc.with_file(self.filename) from None
        return self._snapshots

    def bitmaps(self) -> list[BitmapEntry]:
        """Persistent bitmaps from the bitmap directory (empty when there are none)."""
        if self._bitmaps is None:
            ext = self.header.bitmaps
            if ext is None or not self.header.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
                # Without the autoclear bit the extension is stale and must be ignored.
                self._bitmaps = []
            else:
                from qcowlib.formats.qcow2.bitmap import (
                    MAX_BITMAP_DIRECTORY_SIZE,
                    parse_bitmap_directory,
                )

                if ext.bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE:
                    raise CorruptImage(
                        "bitmap directory is too large",
                        file=self.filename,
                        structure="bitmaps extension",
                        field="bitmap_directory_size",
                    )
                raw = self.host.pread_exact(
                    ext.bitmap_directory_offset, ext.bitmap_directory_size, "bitmap directory"
                )
                try:
                    self._bitmaps = parse_bitmap_directory(raw, ext.nb_bitmaps)
                except QcowlibError as exc:
                    raise exc.with_file(self.filename) from None
        return self._bitmaps

    # -- refcounts ----------------------------------------------------------------------
    def refcount_table(self) -> tables.U64:
        """Refcount block offsets from the refcount table (0: no block)."""
        import numpy as np

        from qcowlib.formats.qcow2 import refcount, tables

        h = self.header
        size = h.refcount_table_clusters * self.cluster_size
        raw = self.host.pread_exact(h.refcount_table_offset, size, "refcount table")
        entries = tables.decode_table(raw) & np.uint64(refcount.REFT_OFFSET_MASK)
        bad = np.flatnonzero(entries & np.uint64(self.cluster_size - 1))
        if bad.size:
            raise CorruptImage(
                f"refcount table entry {int(bad[0])} is not cluster aligned",
                file=self.filename,
                structure="refcount table",
                field=f"entry[{int(bad[0])}]",
            )
        return entries

    def refcount_block(self, offset: int) -> tables.U64:
        """The refcounts in the block at ``offset``, one ``uint64`` per cluster."""
        from qcowlib.formats.qcow2 import refcount

        raw = self.host.pread_exact(offset, self.cluster_size, "refcount block")
        return refcount.decode_block(raw, self.header.refcount_order)

    def metadata_preallocated(self) -> bool:
        """QEMU's ``qcow2_detect_metadata_preallocation``.

        True when clearly more clusters have a refcount than the file has allocated
        blocks: then data clusters may be holes in the file, and the map reports those
        as zero (qemu-img map recurses into the file for them).
        """
        if self._metadata_prealloc is None:
            real_clusters = self.host.allocated // self.cluster_size
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            try:
                count = self._count_refcounts(threshold)
            except QcowlibError as exc:
                # Only the map's hole detail depends on this; reads must not fail on it.
                log.debug(
                    "%s: refcounts unreadable, no preallocation check: %s", self.filename, exc
                )
                count = 0
            self._metadata_prealloc = count >= threshold
        return self._metadata_prealloc

    def _count_refcounts(self, threshold: int) -> int:
        """Clusters of the file with a refcount, counted until ``threshold`` is reached;
        without numpy while it is not loaded and the refcount table is small."""
        h = self.header
        cs = self.cluster_size
        end_cluster = -(-self.host.size // cs)
        per_block = entries_per_block(self.cluster_bits, h.refcount_order)
        count_block: Callable[[int, int], int]
        if (
            reader_plain.numpy_loaded()
            or h.refcount_table_clusters * cs // 8 > reader_plain.PLAIN_REFTABLE_ENTRIES
        ):
            import numpy as np

            offsets: Iterable[int] = self.refcount_table()

            def count_block(offset: int, n: int) -> int:
                return int(np.count_nonzero(self.refcount_block(offset)[:n]))
        else:
            from qcowlib.formats.qcow2 import tables_plain

            size = h.refcount_table_clusters * cs
            raw = self.host.pread_exact(h.refcount_table_offset, size, "refcount table")
            try:
                offsets = tables_plain.reftable_offsets(raw, cs)
            except QcowlibError as exc:
                raise exc.with_file(self.filename) from None

            def count_block(offset: int, n: int) -> int:
                raw = self.host.pread_exact(offset, cs, "refcount block")
                return tables_plain.count_refcounts(raw, h.refcount_order, min(n, per_block))

        count = 0
        for block_index, offset in enumerate(offsets):
            first = block_index * per_block
            if first >= end_cluster or count >= threshold:
                break
            if offset:
                count += count_block(int(offset), end_cluster - first)
        return count
