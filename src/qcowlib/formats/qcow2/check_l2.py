"""``check_refcounts_l2`` over one whole L2 table at once.

Each table is decoded with numpy into masks (compressed, allocated, misaligned, past
the end of the file, ...), its references into one array of host clusters; only the
entries with something to report are looked at one by one.  ``-r all`` turns misaligned
preallocated zero clusters into plain zero clusters, as QEMU's ``fix_l2_entry_by_zero``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.errors import QcowlibError
from qcowlib.formats.qcow2 import tables as _tables
from qcowlib.formats.qcow2.checkstate import EIO, CheckState, eof_message
from qcowlib.formats.qcow2.imrt import ranges
from qcowlib.formats.qcow2.overlap import QCOW2_OL_ACTIVE_L2, QCOW2_OL_INACTIVE_L2

if TYPE_CHECKING:
    import numpy.typing as npt

    from qcowlib.formats.qcow2.tables import U64

    I64 = npt.NDArray[np.int64]
    Bools = npt.NDArray[np.bool_]

L2E_OFFSET_MASK: Final = _tables.OFFSET_MASK
L2E_STD_RESERVED_MASK: Final = _tables.L2E_STD_RESERVED_MASK
QCOW_OFLAG_COPIED: Final = _tables.OFLAG_COPIED
QCOW_OFLAG_COMPRESSED: Final = _tables.OFLAG_COMPRESSED
QCOW_OFLAG_ZERO: Final = _tables.OFLAG_ZERO
QCOW_L2_BITMAP_ALL_ALLOC: Final = 0xFFFF_FFFF
QCOW_L2_BITMAP_ALL_ZEROES: Final = QCOW_L2_BITMAP_ALL_ALLOC << 32
#: Decoded L2 tables whose references are remembered for reuse (snapshot L1 tables
#: usually share L2 tables with the active one), in entries.
L2_CACHE_ENTRIES: Final = 1 << 22


@dataclass
class L2Scan:
    """What check_refcounts_l2 found in one L2 table.

    ``refs`` are the referenced host clusters in QEMU's order; each message is keyed by
    the number of those references made before it was printed.
    """

    refs: I64
    msgs: list[tuple[int, str]] = field(default_factory=list)
    corruptions: int = 0
    corruptions_fixed: int = 0
    check_errors: int = 0
    allocated: int = 0
    compressed: int = 0
    fragmented: int = 0
    #: errno text when checking must stop (a metadata overlap while fixing).
    failure: str | None = None
    cacheable: bool = True


def _empty() -> L2Scan:
    return L2Scan(refs=np.zeros(0, dtype=np.int64))


@dataclass
class _Masks:
    """One table's entries, classified as check_refcounts_l2 does."""

    entries: U64
    bitmaps: U64
    off: U64
    compressed: Bools
    allocated: Bools  # QCOW2_CLUSTER_NORMAL or ZERO_ALLOC
    reserved: Bools
    comp_copied: Bools
    comp_datafile: Bools
    comp_bitmap: Bools
    comp_ok: Bools
    bad_bitmap: Bools
    unaligned: Bools
    prealloc_unaligned: Bools
    unalloc_bad: Bools


class L2Scanner:
    """Scans L2 tables for one check pass, remembering scans for snapshot tables."""

    def __init__(self, chk: CheckState) -> None:
        self.chk = chk
        self._cache: dict[tuple[int, int, bool], L2Scan] = {}
        self._cached_entries = 0

    def scan(self, l2_offset: int, fixing: bool, active: bool) -> L2Scan:
        """check_refcounts_l2 for the table at ``l2_offset``."""
        file_len = self.chk.host.size
        key = (l2_offset, file_len, fixing)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if l2_offset >= file_len:
            return _empty()
        table = self.chk.read_l2(l2_offset)
        if not table.any():
            return _empty()
        scan = self.scan_entries(table, l2_offset, fixing, active)
        # Snapshot L1 tables share most L2 tables with the active one: remember scans.
        if (
            self.chk.snapshots
            and scan.cacheable
            and self._cached_entries + scan.refs.size <= L2_CACHE_ENTRIES
        ):
            self._cache[key] = scan
            self._cached_entries += max(1, int(scan.refs.size))
        return scan

    def rescan_refs(self, l2_offset: int) -> I64:
        """The references an L2 table makes (read again; fixed entries make none)."""
        return self.scan_entries(self.chk.read_l2(l2_offset), l2_offset, False, True).refs

    def scan_entries(self, table: U64, l2_offset: int, fixing: bool, active: bool) -> L2Scan:
        chk = self.chk
        file_len = chk.host.size
        if not chk.extended and not chk.has_data_file:
            fast = _fast_scan(table, file_len, chk.cluster_size, chk.cluster_bits)
            if fast is not None:
                return fast
        m = self._classify(table)
        scan = _empty()
        n = m.entries.size
        fixed = np.zeros(n, dtype=bool)
        limit = n  # entries past a failed fix are not checked (QEMU aborts the table)
        fix_msgs: dict[int, list[str]] = {}
        if fixing and m.prealloc_unaligned.any():
            limit = self._fix_prealloc(table, l2_offset, active, m, scan, fixed, fix_msgs)
        live = np.zeros(n, dtype=bool)
        live[:limit] = True
        start, size, eof, refstart = self._count_refs(m, fixed, live, scan)
        problems = (
            m.reserved
            | m.comp_copied
            | m.comp_datafile
            | m.comp_bitmap
            | m.bad_bitmap
            | m.unaligned
            | m.unalloc_bad
            | eof
        )
        problems[limit + 1 :] = False
        for i in np.flatnonzero(problems).tolist():
            self._report(i, int(refstart[i]), m, fixing, fixed, fix_msgs, scan)
            if eof[i]:
                scan.msgs.append((int(refstart[i]), eof_message(int(start[i]), int(size[i]))))
                scan.corruptions += 1
        return scan

    def _classify(self, table: U64) -> _Masks:
        chk = self.chk
        u = np.uint64
        if chk.extended:
            entries, bitmaps = table[0::2], table[1::2]
        else:
            entries, bitmaps = table, np.zeros(table.size, dtype=np.uint64)
        n = entries.size
        compressed = (entries & u(QCOW_OFLAG_COMPRESSED)) != 0
        noncomp = ~compressed
        copied = (entries & u(QCOW_OFLAG_COPIED)) != 0
        off = entries & u(L2E_OFFSET_MASK)
        has_off = off != 0
        zflag = np.zeros(n, dtype=bool) if chk.extended else (entries & u(QCOW_OFLAG_ZERO)) != 0
        plain = noncomp & ~zflag
        normal = plain & (has_off | copied) if chk.has_data_file else plain & has_off
        allocated = normal | (noncomp & zflag & has_off)
        unallocated = plain & ~normal
        if chk.has_data_file:
            comp_datafile, comp_bitmap = compressed, np.zeros(n, dtype=bool)
        else:
            comp_datafile, comp_bitmap = np.zeros(n, dtype=bool), compressed & (bitmaps != 0)
        unaligned = allocated & ((off & u(chk.cluster_size - 1)) != 0)
        if chk.extended:
            contains_data = (bitmaps & u(QCOW_L2_BITMAP_ALL_ALLOC)) != 0
        else:
            contains_data = ~zflag
        return _Masks(
            entries=entries,
            bitmaps=bitmaps,
            off=off,
            compressed=compressed,
            allocated=allocated,
            reserved=noncomp & ((entries & u(L2E_STD_RESERVED_MASK)) != 0),
            comp_copied=compressed & copied,
            comp_datafile=comp_datafile,
            comp_bitmap=comp_bitmap,
            comp_ok=compressed & ~comp_datafile & ~comp_bitmap,
            bad_bitmap=allocated & (((bitmaps >> u(32)) & bitmaps) != 0),
            unaligned=unaligned,
            prealloc_unaligned=unaligned & ~contains_data,
            unalloc_bad=unallocated & ((bitmaps & u(QCOW_L2_BITMAP_ALL_ALLOC)) != 0),
        )

    def _fix_prealloc(
        self,
        table: U64,
        l2_offset: int,
        active: bool,
        m: _Masks,
        scan: L2Scan,
        fixed: Bools,
        fix_msgs: dict[int, list[str]],
    ) -> int:
        """-r all: fix the misaligned preallocated zero clusters; returns how many
        entries stay live (all of them, unless a fix hit metadata)."""
        scan.cacheable = False
        for i in np.flatnonzero(m.prealloc_unaligned).tolist():
            ok, lines = self._fix_l2_entry_by_zero(table, l2_offset, i, active)
            fix_msgs[i] = lines
            if ok is None:
                scan.check_errors += 1
                scan.failure = EIO
                return i
            if ok:
                fixed[i] = True
                scan.corruptions_fixed += 1
            else:
                scan.check_errors += 1
        return m.entries.size

    def _count_refs(
        self, m: _Masks, fixed: Bools, live: Bools, scan: L2Scan
    ) -> tuple[I64, I64, Bools, I64]:
        """The ranges counted into the IMRT, one per entry at most, and the counts of
        allocated, compressed and fragmented clusters."""
        chk = self.chk
        cs, cb = chk.cluster_size, chk.cluster_bits
        n = m.entries.size
        start = np.zeros(n, dtype=np.int64)
        size = np.zeros(n, dtype=np.int64)
        if m.comp_ok.any():
            c_off, c_len = chk.compressed_layout.decode(m.entries[m.comp_ok])
            start[m.comp_ok] = c_off.astype(np.int64)
            size[m.comp_ok] = c_len.astype(np.int64)
        refable = m.comp_ok.copy()
        if not chk.has_data_file:
            start[m.allocated] = m.off[m.allocated].astype(np.int64)
            size[m.allocated] = cs
            refable |= m.allocated & ~fixed
        refable &= live
        eof = refable & (start + size - chk.host.size >= cs)
        counted = refable & ~eof
        first = start >> cb
        count = np.where(counted, ((start + size - 1) >> cb) - first + 1, 0)
        scan.refs = ranges(first[counted], count[counted])
        comp_live = m.comp_ok & live
        normal_offs = m.off[m.allocated & ~fixed & live]
        scan.allocated = int(comp_live.sum()) + int(normal_offs.size)
        scan.compressed = int(comp_live.sum())
        scan.fragmented = int(comp_live.sum()) + int(
            np.count_nonzero(normal_offs[1:] != normal_offs[:-1] + np.uint64(cs))
        )
        return start, size, eof, np.cumsum(count) - count

    def _report(
        self,
        i: int,
        pos: int,
        m: _Masks,
        fixing: bool,
        fixed: Bools,
        fix_msgs: dict[int, list[str]],
        scan: L2Scan,
    ) -> None:
        """The messages of entry ``i`` (but the one for a range past the end)."""
        entry = int(m.entries[i])
        say = scan.msgs.append
        if m.reserved[i]:
            say((pos, f"ERROR found l2 entry with reserved bits set: {entry:x}"))
            scan.corruptions += 1
        if m.compressed[i]:
            if m.comp_copied[i]:
                coffset = entry & self.chk.compressed_layout.offset_mask
                say(
                    (
                        pos,
                        f"ERROR: coffset=0x{coffset:x}: copied flag must never be set "
                        "for compressed clusters",
                    )
                )
                entry &= ~QCOW_OFLAG_COPIED
                scan.corruptions += 1
            if m.comp_datafile[i]:
                say((pos, f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}"))
                scan.corruptions += 1
            elif m.comp_bitmap[i]:
                say(
                    (
                        pos,
                        f"ERROR compressed cluster {i} with non-zero subcluster "
                        f"allocation bitmap, entry=0x{entry:x}",
                    )
                )
                scan.corruptions += 1
        elif m.allocated[i]:
            self._report_allocated(i, pos, m, fixing, fixed, fix_msgs, scan)
        elif m.unalloc_bad[i]:
            say((pos, "ERROR: Unallocated cluster has non-zero subcluster allocation map"))
            scan.corruptions += 1

    def _report_allocated(
        self,
        i: int,
        pos: int,
        m: _Masks,
        fixing: bool,
        fixed: Bools,
        fix_msgs: dict[int, list[str]],
        scan: L2Scan,
    ) -> None:
        offset = int(m.off[i])
        say = scan.msgs.append
        if m.bad_bitmap[i]:
            say(
                (
                    pos,
                    f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                    "subcluster allocation bitmap",
                )
            )
            scan.corruptions += 1
        if not m.unaligned[i]:
            return
        scan.corruptions += 1
        if m.prealloc_unaligned[i]:
            word = "Repairing" if fixing else "ERROR"
            say(
                (
                    pos,
                    f"{word} offset={offset:x}: Preallocated cluster is not "
                    "properly aligned; L2 entry corrupted.",
                )
            )
            for line in fix_msgs.get(i, ()):
                say((pos, line))
            if fixed[i]:
                scan.corruptions -= 1
        else:
            say(
                (
                    pos,
                    f"ERROR offset={offset:x}: Data cluster is not properly "
                    "aligned; L2 entry corrupted.",
                )
            )

    def _fix_l2_entry_by_zero(
        self, table: U64, l2_offset: int, index: int, active: bool
    ) -> tuple[bool | None, list[str]]:
        """fix_l2_entry_by_zero: True fixed, False write failed, None metadata overlap."""
        chk = self.chk
        esize = chk.l2_entry_size
        if chk.extended:
            bitmap = int(table[2 * index + 1])
            bitmap = (bitmap | (bitmap << 32)) & QCOW_L2_BITMAP_ALL_ZEROES
            data = struct.pack(">QQ", 0, bitmap)
        else:
            data = struct.pack(">Q", QCOW_OFLAG_ZERO)
        where = l2_offset + index * esize
        ign = QCOW2_OL_ACTIVE_L2 if active else QCOW2_OL_INACTIVE_L2
        if not chk.pre_write_overlap_check(ign, where, esize):
            return None, ["ERROR: Overlap check failed"]
        try:
            chk.write(where, data)
        except QcowlibError as exc:
            return False, [f"ERROR: Failed to overwrite L2 table entry: {exc.message}"]
        return True, []


def _fast_scan(table: U64, file_len: int, cs: int, cb: int) -> L2Scan | None:
    """Only aligned standard and zero clusters inside the file: the common case."""
    u = np.uint64
    unusual = L2E_STD_RESERVED_MASK | QCOW_OFLAG_COMPRESSED | ((cs - 1) & ~0x1FF)
    if (table & u(unusual)).any():
        return None
    off = table & u(L2E_OFFSET_MASK)
    offs = off[off != 0]
    if offs.size and int(offs.max()) >= file_len:
        return None
    return L2Scan(
        refs=(offs >> u(cb)).astype(np.int64),
        allocated=int(offs.size),
        fragmented=int(np.count_nonzero(offs[1:] != offs[:-1] + u(cs))),
    )
