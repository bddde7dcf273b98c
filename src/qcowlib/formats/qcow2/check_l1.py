"""``check_refcounts_l1``: an L1 table, its L2 tables and what they reference.

Without fixes the whole table is handled at once: each distinct L2 table inside the
file is scanned once and its references counted once per L1 entry using it; where
messages go in QEMU's order comes from a cumulative sum.  L1 entries that point past
the end of the file cost no I/O (QEMU reads zeros there), and messages are only made
for as many entries as are kept (:data:`~qcowlib.formats.qcow2.checkstate.MAX_MESSAGES`);
the counts cover all of them.  A table that runs past the end of the file is read only
as far as the file goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.formats.qcow2 import tables as _tables
from qcowlib.formats.qcow2.check_l2 import L2Scan, L2Scanner
from qcowlib.formats.qcow2.checkstate import EIO, CheckFailed, CheckState, Result, eof_message
from qcowlib.formats.qcow2.imrt import Recorder, ranges
from qcowlib.formats.qcow2.refcount_store import BDRV_MAX_LENGTH

if TYPE_CHECKING:
    import numpy.typing as npt

    from qcowlib.formats.qcow2.tables import U64

    I64 = npt.NDArray[np.int64]
    Bools = npt.NDArray[np.bool_]

L1E_OFFSET_MASK: Final = _tables.OFFSET_MASK
L1E_RESERVED_MASK: Final = _tables.L1E_RESERVED_MASK
#: L1 entries handled in one step (bounds the temporary arrays of a huge table).
CHUNK_ENTRIES: Final = 1 << 18


def check_refcounts_l1(
    chk: CheckState,
    scanner: L2Scanner,
    rec: Recorder,
    res: Result,
    l1_offset: int,
    l1_size: int,
    *,
    frag: bool,
    fixing: bool,
    active: bool,
) -> None:
    """check_refcounts_l1 (``fixing``: with BDRV_FIX_ERRORS)."""
    if not l1_size:
        return
    rec.inc(l1_offset, l1_size * 8)
    if l1_offset + l1_size * 8 > BDRV_MAX_LENGTH:
        rec.msg("ERROR: I/O error in check_refcounts_l1")
        res.check_errors += 1
        raise CheckFailed(EIO)
    l1 = chk.read_table(l1_offset, l1_size)
    entries = l1[np.flatnonzero(l1)]
    del l1
    if not entries.size:
        return
    if not fixing:
        for lo in range(0, entries.size, CHUNK_ENTRIES):
            chunk = entries[lo : lo + CHUNK_ENTRIES]
            _entries_bulk(chk, scanner, rec, res, chunk, frag=frag, active=active)
        return
    # Fixing: a table fixed on one visit reads differently on the next, so the entries
    # whose table lies inside the file go in order; runs of the others go in bulk.
    inside = (entries & np.uint64(L1E_OFFSET_MASK)) < np.uint64(chk.host.size)
    bounds = np.flatnonzero(np.diff(inside.astype(np.int8))) + 1
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), entries.size], strict=True):
        if not inside[lo]:
            _entries_bulk(chk, scanner, rec, res, entries[lo:hi], frag=frag, active=active)
            continue
        for entry in entries[lo:hi].tolist():
            _entry_fixing(chk, scanner, rec, res, entry, frag=frag, active=active)


def _entry_fixing(
    chk: CheckState,
    scanner: L2Scanner,
    rec: Recorder,
    res: Result,
    entry: int,
    *,
    frag: bool,
    active: bool,
) -> None:
    """One L1 entry and its L2 table, fixing what -r all fixes."""
    cs = chk.cluster_size
    if entry & L1E_RESERVED_MASK:
        rec.msg(f"ERROR found L1 entry with reserved bits set: {entry:x}")
        res.corruptions += 1
    l2_offset = entry & L1E_OFFSET_MASK
    rec.inc(l2_offset, cs)
    if l2_offset & (cs - 1):
        rec.msg(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
        res.corruptions += 1
    scan = scanner.scan(l2_offset, True, active)
    base = rec.n
    for rel, text in scan.msgs:
        rec.msg(text, base + rel)
    rec.add(scan.refs, l2_offset)
    _add_counts(res, scan, 1, frag)
    res.corruptions_fixed += scan.corruptions_fixed
    if scan.failure is not None:
        raise CheckFailed(scan.failure)


def _add_counts(res: Result, scan: L2Scan, times: int, frag: bool) -> None:
    res.corruptions += scan.corruptions * times
    res.check_errors += scan.check_errors * times
    if frag:
        res.allocated_clusters += scan.allocated * times
        res.compressed_clusters += scan.compressed * times
        res.fragmented_clusters += scan.fragmented * times


@dataclass
class _L1Entries:
    """Non-zero L1 entries, classified as check_refcounts_l1 does."""

    entries: U64
    l2: I64  # the L2 table offsets
    reserved: Bools
    unaligned: Bools
    eof: Bools  # inc_refcounts(l2_offset, cluster_size) refuses them
    first: I64  # the tables' first clusters
    own: I64  # how many clusters each table spans (0 past the end)

    @classmethod
    def classify(cls, chk: CheckState, entries: U64) -> _L1Entries:
        u = np.uint64
        cs, cb = chk.cluster_size, chk.cluster_bits
        l2 = (entries & u(L1E_OFFSET_MASK)).astype(np.int64)
        eof = l2 >= chk.host.size
        first = l2 >> cb
        return cls(
            entries=entries,
            l2=l2,
            reserved=(entries & u(L1E_RESERVED_MASK)) != 0,
            unaligned=(l2 & (cs - 1)) != 0,
            eof=eof,
            first=first,
            own=np.where(eof, 0, ((l2 + cs - 1) >> cb) - first + 1),
        )


def _entries_bulk(
    chk: CheckState,
    scanner: L2Scanner,
    rec: Recorder,
    res: Result,
    entries: U64,
    *,
    frag: bool,
    active: bool,
) -> None:
    """The loop of check_refcounts_l1 over all (non-zero) ``entries`` at once, no fixes."""
    if entries.size == 0:
        return
    e = _L1Entries.classify(chk, entries)
    inside = ~e.eof
    tables, which_inside, uses = np.unique(e.l2[inside], return_inverse=True, return_counts=True)
    # Entries past the end use a last, empty "table".
    which = np.full(e.l2.size, tables.size, dtype=np.int64)
    which[inside] = which_inside
    sizes = np.zeros(tables.size + 1, dtype=np.int64)
    n_table_msgs = np.zeros(tables.size + 1, dtype=np.int64)
    table_msgs: list[list[tuple[int, str]]] = []
    for j, offset in enumerate(tables.tolist()):
        scan = scanner.scan(offset, False, active)
        rec.count(scan.refs, int(uses[j]))
        _add_counts(res, scan, int(uses[j]), frag)
        sizes[j] = scan.refs.size
        n_table_msgs[j] = len(scan.msgs)
        table_msgs.append(scan.msgs)
    table_msgs.append([])
    rec.count(ranges(e.first[inside], e.own[inside]))
    res.corruptions += int(e.reserved.sum() + e.eof.sum() + e.unaligned.sum())
    per_entry = e.own + sizes[which]
    start = rec.n + np.cumsum(per_entry) - per_entry
    n_msgs = e.reserved + e.eof + e.unaligned + n_table_msgs[which]
    _messages(chk, rec, e, start, n_msgs, which, table_msgs)
    counted = np.flatnonzero(per_entry)
    rec.add_stream(
        int(per_entry.sum()), _replay(scanner, e.first[counted], e.own[counted], e.l2[counted])
    )


def _messages(
    chk: CheckState,
    rec: Recorder,
    e: _L1Entries,
    start: I64,
    n_msgs: I64,
    which: I64,
    table_msgs: list[list[tuple[int, str]]],
) -> None:
    """The messages of the entries (``which`` names each one's table in
    ``table_msgs``), placed where QEMU prints them, as far as they are kept; the others
    are only counted."""
    noisy = np.flatnonzero(n_msgs)
    done = 0
    for i in noisy[: rec.room].tolist():  # each makes one message at least
        if rec.room <= 0:
            break
        done += 1
        pos, entry, offset = int(start[i]), int(e.entries[i]), int(e.l2[i])
        after = pos + int(e.own[i])
        if e.reserved[i]:
            rec.msg(f"ERROR found L1 entry with reserved bits set: {entry:x}", pos)
        if e.eof[i]:
            rec.msg(eof_message(offset, chk.cluster_size), pos)
        if e.unaligned[i]:
            rec.msg(
                f"ERROR l2_offset={offset:x}: Table is not cluster aligned; L1 entry corrupted",
                after,
            )
        for rel, text in table_msgs[int(which[i])]:
            rec.msg(text, after + rel)
    rec.dropped += int(n_msgs[noisy[done:]].sum())


def _replay(scanner: L2Scanner, first: I64, own: I64, l2: I64) -> Callable[[], I64]:
    """A function that makes the references of L1 entries again, in order: each
    table's own clusters, then what the table references."""

    def replay() -> I64:
        parts: list[I64] = []
        memo: dict[int, I64] = {}
        for f, n, offset in zip(first.tolist(), own.tolist(), l2.tolist(), strict=True):
            parts.append(np.arange(f, f + n, dtype=np.int64))
            if offset not in memo:
                memo[offset] = scanner.rescan_refs(offset)
            parts.append(memo[offset])
        return np.concatenate(parts)

    return replay
