"""Metadata overlap checks before metadata writes (QEMU's ``QCOW2_OL_*``).

A write that would land on the header, an L1 or L2 table, the refcount table or a
refcount block, the snapshot table or the bitmap directory is refused before it is
made (QEMU ``block/qcow2-refcount.c``: ``qcow2_check_metadata_overlap`` in its default
"cached" mode, which leaves out inactive L2 tables).  One :class:`MetadataAreas` serves
the in-place writer and the repairs of ``check``.  Pure: the caller says where the
metadata lies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.formats.qcow2.refcount import REFT_OFFSET_MASK
from qcowlib.formats.qcow2.tables import OFFSET_MASK, U64

if TYPE_CHECKING:
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]

__all__ = [
    "OL_NAMES",
    "QCOW2_OL_ACTIVE_L1",
    "QCOW2_OL_ACTIVE_L2",
    "QCOW2_OL_BITMAP_DIRECTORY",
    "QCOW2_OL_CACHED",
    "QCOW2_OL_INACTIVE_L1",
    "QCOW2_OL_INACTIVE_L2",
    "QCOW2_OL_MAIN_HEADER",
    "QCOW2_OL_REFCOUNT_BLOCK",
    "QCOW2_OL_REFCOUNT_TABLE",
    "QCOW2_OL_SNAPSHOT_TABLE",
    "MetadataAreas",
    "ranges_overlap",
]

# QCow2MetadataOverlap bits (block/qcow2.h).
QCOW2_OL_MAIN_HEADER: Final = 1 << 0
QCOW2_OL_ACTIVE_L1: Final = 1 << 1
QCOW2_OL_ACTIVE_L2: Final = 1 << 2
QCOW2_OL_REFCOUNT_TABLE: Final = 1 << 3
QCOW2_OL_REFCOUNT_BLOCK: Final = 1 << 4
QCOW2_OL_SNAPSHOT_TABLE: Final = 1 << 5
QCOW2_OL_INACTIVE_L1: Final = 1 << 6
QCOW2_OL_INACTIVE_L2: Final = 1 << 7
QCOW2_OL_BITMAP_DIRECTORY: Final = 1 << 8
#: The default mode: everything but inactive L2 tables (reading those costs I/O).
QCOW2_OL_CACHED: Final = 0x1FF & ~QCOW2_OL_INACTIVE_L2

#: The names QEMU's messages give the areas.
OL_NAMES: Final = {
    QCOW2_OL_MAIN_HEADER: "qcow2_header",
    QCOW2_OL_ACTIVE_L1: "active L1 table",
    QCOW2_OL_ACTIVE_L2: "active L2 table",
    QCOW2_OL_REFCOUNT_TABLE: "refcount table",
    QCOW2_OL_REFCOUNT_BLOCK: "refcount block",
    QCOW2_OL_SNAPSHOT_TABLE: "snapshot table",
    QCOW2_OL_INACTIVE_L1: "inactive L1 table",
    QCOW2_OL_INACTIVE_L2: "inactive L2 table",
    QCOW2_OL_BITMAP_DIRECTORY: "bitmap directory",
}

#: Table entries at or above this are offsets no file reaches (and would overflow int64).
_FAR: Final = np.uint64(1 << 62)


def ranges_overlap(a: int, a_len: int, b: int, b_len: int) -> bool:
    """Whether ``[a, a + a_len)`` and ``[b, b + b_len)`` share a byte."""
    if a_len == 0 or b_len == 0:
        return False
    return not (b + b_len - 1 < a or a + a_len - 1 < b)


def _one_cluster_areas(entries: U64, mask: int) -> I64:
    """The sorted offsets of the one-cluster areas a table's entries point at."""
    s = entries & np.uint64(mask)
    return np.sort(s[(s != 0) & (s < _FAR)].astype(np.int64))


def _cluster_hits(starts: I64, lo: int, hi: int, cluster_size: int) -> bool:
    """Whether any one-cluster area ``[s, s + cluster_size)`` of sorted ``starts`` meets
    ``[lo, hi)``."""
    i = int(np.searchsorted(starts, lo - cluster_size, side="right"))
    return i < starts.size and int(starts[i]) < hi


@dataclass
class MetadataAreas:
    """Where an image's metadata lies, as ``(offset, length in bytes)`` areas.

    ``l1_table`` and ``refcount_table`` are the raw tables in memory (their entries'
    offsets are the L2 tables and refcount blocks); ``inactive_l1`` holds each
    snapshot's L1 table area.  The tables' offsets are sorted on first use: build a
    new instance when they change.
    """

    cluster_size: int
    l1: tuple[int, int]
    refcount_table: tuple[int, int]
    l1_table: U64
    reftable_entries: U64
    snapshot_table: tuple[int, int] = (0, 0)
    inactive_l1: list[tuple[int, int]] = field(default_factory=list)
    bitmap_directory: tuple[int, int] = (0, 0)
    _l2: I64 | None = field(default=None, repr=False)
    _refblocks: I64 | None = field(default=None, repr=False)

    def first_overlap(
        self, offset: int, size: int, *, ign: int = 0, allow: int | None = None
    ) -> int:
        """The ``QCOW2_OL_*`` bit of the first area (in QEMU's order) that a write of
        ``size`` bytes at ``offset`` would touch, or 0.

        ``ign`` leaves out areas by bit, as QEMU's callers do; ``allow`` leaves out one
        cluster (by index), the metadata cluster the write is meant to change.
        """
        if not size:
            return 0
        cs = self.cluster_size
        first, last = offset // cs, (offset + size - 1) // cs
        if allow is None or not first <= allow <= last:
            return self._check(QCOW2_OL_CACHED & ~ign, first * cs, (last + 1 - first) * cs)
        for lo, hi in ((first, allow), (allow + 1, last + 1)):
            if lo < hi:
                hit = self._check(QCOW2_OL_CACHED & ~ign, lo * cs, (hi - lo) * cs)
                if hit:
                    return hit
        return 0

    def _check(self, chk: int, offset: int, size: int) -> int:
        """qcow2_check_metadata_overlap on a cluster-aligned range."""
        if chk & QCOW2_OL_MAIN_HEADER and offset < self.cluster_size:
            return QCOW2_OL_MAIN_HEADER
        if chk & QCOW2_OL_ACTIVE_L1 and ranges_overlap(offset, size, *self.l1):
            return QCOW2_OL_ACTIVE_L1
        if chk & QCOW2_OL_REFCOUNT_TABLE and ranges_overlap(offset, size, *self.refcount_table):
            return QCOW2_OL_REFCOUNT_TABLE
        if chk & QCOW2_OL_SNAPSHOT_TABLE and ranges_overlap(offset, size, *self.snapshot_table):
            return QCOW2_OL_SNAPSHOT_TABLE
        if chk & QCOW2_OL_INACTIVE_L1 and any(
            ranges_overlap(offset, size, *area) for area in self.inactive_l1
        ):
            return QCOW2_OL_INACTIVE_L1
        end = offset + size
        cs = self.cluster_size
        if chk & QCOW2_OL_ACTIVE_L2:
            if self._l2 is None:
                self._l2 = _one_cluster_areas(self.l1_table, OFFSET_MASK)
            if _cluster_hits(self._l2, offset, end, cs):
                return QCOW2_OL_ACTIVE_L2
        if chk & QCOW2_OL_REFCOUNT_BLOCK:
            if self._refblocks is None:
                self._refblocks = _one_cluster_areas(self.reftable_entries, REFT_OFFSET_MASK)
            if _cluster_hits(self._refblocks, offset, end, cs):
                return QCOW2_OL_REFCOUNT_BLOCK
        if chk & QCOW2_OL_BITMAP_DIRECTORY and ranges_overlap(offset, size, *self.bitmap_directory):
            return QCOW2_OL_BITMAP_DIRECTORY
        return 0
