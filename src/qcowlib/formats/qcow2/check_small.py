"""``check`` of a small, plain qcow2 image without numpy: a proof of "no errors", or none.

The check (:mod:`~qcowlib.formats.qcow2.check`) works on whole tables with numpy, and
importing numpy costs more (~40 ms) than checking a small image takes; ``validate``
runs the check on every qcow2 it accepts.  So before it, one plain pass looks at images
whose tables hold at most :data:`SMALL_CHECK_ENTRIES` entries in all (the L1 table, the
L2 tables, the refcount table and one refcount per cluster of the file) and whose
metadata is of the plain kind ``qemu-img`` writes: no snapshots, bitmaps, encryption,
data file, extended L2 entries or incompatible feature bits (but the compression type),
and refcounts of 8 bits or more.

The pass counts every reference the check counts (``calculate_refcounts``: the header,
the L1 table, each L2 table and the clusters it maps, the refcount table and blocks) and
answers only when everything is as a consistent image has it: each table wholly inside
the file, each offset aligned and without reserved bits, each stored refcount equal to
its references (each refcount block's being 1), and ``OFLAG_COPIED`` set exactly on the
L1 and L2 entries that map a cluster of refcount 1.  Its report is then the one the full check makes
(no findings; QEMU's allocated, fragmented and total cluster counts and image end
offset).  Anything else, however harmless, is left to the full check, which finds and
words the problems: this pass never reports one, so it cannot disagree about one
(tests/formats/test_qcow2_check_small.py compares both on clean and damaged images).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from qcowlib.checkreport import CheckReport
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2.entries import (
    L2E_STD_RESERVED_MASK,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
)

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.hostio import HostIO

__all__ = ["SMALL_CHECK_ENTRIES", "small_check"]

#: Table entries (L1, L2, refcount table, and one refcount per cluster of the file) the
#: plain pass decodes at most: with every entry in use (under a microsecond each) still
#: less than importing numpy alone costs (~40 ms), and a few milliseconds for the sparse
#: tables of most images.  With 64 KiB clusters it takes, say, a 1.5 GiB file with four L2
#: tables (2 GiB of guest space mapped).
SMALL_CHECK_ENTRIES: Final = 1 << 16
_INT64_MAX: Final = 2**63 - 1
_REFCOUNT_CODES: Final = {3: "B", 4: "H", 5: "I", 6: "Q"}


class _Defer(Exception):
    """What the plain pass does not prove consistent: the full check decides."""


def small_check(host: HostIO, h: hdr.Header, path: str) -> CheckReport | None:
    """The report of a read-only check of a small, plain, consistent qcow2 image (read
    with ``read_header(host, for_check=True)``); None when the full check must run."""
    if not _plain_kind(h) or -(-host.size // h.cluster_size) > SMALL_CHECK_ENTRIES:
        return None
    try:
        return _Pass(host, h).run(path)
    except _Defer:
        return None


def _plain_kind(h: hdr.Header) -> bool:
    """Metadata of the kind the plain pass knows (see the module's docstring); the
    snapshot table offset is checked as ``qcow2_check_read_snapshot_table`` does."""
    return (
        not h.extended_l2
        and not h.has_data_file
        and h.crypt_method == hdr.CRYPT_NONE
        and not h.incompatible_features & ~hdr.INCOMPAT_COMPRESSION  # zstd is fine
        and h.refcount_order in _REFCOUNT_CODES
        and h.bitmaps is None
        and h.nb_snapshots == 0
        and not h.snapshots_offset & (h.cluster_size - 1)
        and h.snapshots_offset <= _INT64_MAX
    )


class _Pass:
    """The references of one image, counted per host cluster of the file."""

    def __init__(self, host: HostIO, h: hdr.Header) -> None:
        self.host = host
        self.h = h
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.size = host.size
        self.counts = [0] * -(-host.size // self.cs)
        self.budget = SMALL_CHECK_ENTRIES - len(self.counts)
        #: (host cluster, OFLAG_COPIED set) of every L1 and standard L2 entry mapping one.
        self.mapped: list[tuple[int, bool]] = []
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0

    def run(self, path: str) -> CheckReport:
        h, cs = self.h, self.cs
        self._ref(0, cs)
        l1 = self._table(h.l1_table_offset, h.l1_size) if h.l1_size else ()
        l2_offsets = [self._l2_offset(entry) for entry in l1 if entry]
        self._spend(len(l2_offsets) * (cs // 8))  # before reading any of them
        reftable = self._table(h.refcount_table_offset, h.refcount_table_clusters * cs // 8)
        for offset in l2_offsets:
            self._l2_table(offset)
        blocks = [self._refblock_offset(entry) for entry in reftable if entry]
        for offset in blocks:
            self._ref(offset, cs)
        counts = self.counts
        if (
            max(counts) > (1 << (1 << h.refcount_order)) - 1  # an overflow
            or any(counts[offset >> self.cb] != 1 for offset in blocks)  # a shared block
            or any(copied != (counts[c] == 1) for c, copied in self.mapped)
        ):
            raise _Defer
        self._compare_stored(reftable)
        highest = max(i for i, c in enumerate(counts) if c)
        return CheckReport(
            filename=path,
            format="qcow2",
            image_end_offset=(highest + 1) * cs,
            total_clusters=-(-(-(-h.size // 512) * 512) // cs),
            allocated_clusters=self.allocated,
            fragmented_clusters=self.fragmented,
            compressed_clusters=self.compressed,
        )

    def _spend(self, entries: int) -> None:
        self.budget -= entries
        if self.budget < 0:
            raise _Defer

    def _ref(self, offset: int, length: int) -> None:
        """Count a reference to each cluster of a range inside the file's clusters."""
        for cluster in range(offset >> self.cb, ((offset + length - 1) >> self.cb) + 1):
            self.counts[cluster] += 1

    def _table(self, offset: int, entries: int) -> tuple[int, ...]:
        """A table of big-endian 64-bit entries wholly inside the file, its clusters
        counted."""
        self._spend(entries)
        if offset + entries * 8 > self.size:
            raise _Defer
        self._ref(offset, entries * 8)
        return struct.unpack(f">{entries}Q", self.host.pread(offset, entries * 8))

    def _l2_offset(self, entry: int) -> int:
        """The L2 table of an L1 entry without reserved bits, aligned, inside the file."""
        offset = entry & OFFSET_MASK
        if (
            entry & ~(OFFSET_MASK | OFLAG_COPIED)
            or not offset
            or offset & (self.cs - 1)
            or offset + self.cs > self.size
        ):
            raise _Defer
        self.mapped.append((offset >> self.cb, bool(entry & OFLAG_COPIED)))
        return offset

    def _l2_table(self, offset: int) -> None:
        """An L2 table's cluster and the clusters it maps: standard and preallocated zero
        clusters aligned and inside the file, compressed ones inside its last cluster."""
        cs, cb = self.cs, self.cb
        self._ref(offset, cs)
        unusual = L2E_STD_RESERVED_MASK | ((cs - 1) & ~0x1FF)
        offset_bits = 62 - (cb - 8)  # of a compressed cluster descriptor
        previous = None
        for entry in struct.unpack(f">{cs // 8}Q", self.host.pread(offset, cs)):
            if not entry:
                continue
            if entry & OFLAG_COMPRESSED:
                self._compressed(entry, offset_bits)
                continue
            if entry & unusual:
                raise _Defer
            data = entry & OFFSET_MASK
            if not data:
                continue  # a zero cluster without a preallocated one: no reference
            if data >= self.size:
                raise _Defer
            self.counts[data >> cb] += 1
            self.mapped.append((data >> cb, bool(entry & OFLAG_COPIED)))
            self.allocated += 1
            if previous is not None and data != previous + cs:
                self.fragmented += 1
            previous = data

    def _compressed(self, entry: int, offset_bits: int) -> None:
        """A compressed cluster descriptor (qcow2.txt "Compressed Clusters Descriptor")."""
        if entry & OFLAG_COPIED:
            raise _Defer
        start = entry & ((1 << offset_bits) - 1)
        sectors = ((entry >> offset_bits) & ((1 << (self.cb - 8)) - 1)) + 1
        length = sectors * 512 - (start & 511)
        if start + length > len(self.counts) << self.cb:
            raise _Defer
        self._ref(start, length)
        self.allocated += 1
        self.compressed += 1
        self.fragmented += 1

    def _refblock_offset(self, entry: int) -> int:
        """A refcount table entry's block: aligned and inside the file."""
        offset = entry & REFT_OFFSET_MASK
        if entry & REFT_RESERVED_MASK or offset & (self.cs - 1) or offset + self.cs > self.size:
            raise _Defer
        return offset

    def _compare_stored(self, reftable: tuple[int, ...]) -> None:
        """Every cluster's stored refcount equals its references (compare_refcounts)."""
        order = self.h.refcount_order
        code = _REFCOUNT_CODES[order]
        per_block = (self.cs * 8) >> order
        n = len(self.counts)
        for index in range(-(-n // per_block)):
            lo, hi = index * per_block, min(n, (index + 1) * per_block)
            offset = reftable[index] & REFT_OFFSET_MASK if index < len(reftable) else 0
            if offset:
                raw = self.host.pread(offset, (hi - lo) << (order - 3))
                stored = list(struct.unpack(f">{hi - lo}{code}", raw))
            else:
                stored = [0] * (hi - lo)
            if stored != self.counts[lo:hi]:
                raise _Defer
