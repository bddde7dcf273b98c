"""``check_oflag_copied``: ``QCOW_OFLAG_COPIED`` must be set exactly where refcount == 1.

The active L1 table is checked at once; each distinct L2 table inside the file is read
and checked once with numpy, and its findings are counted once per L1 entry using it.
Only the L1 entries with something to report are then visited in order, to print (as
many messages as are kept), to signal corruption where QEMU does, and with repair to
rewrite the flags.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.formats.qcow2 import tables as _tables
from qcowlib.formats.qcow2.checkstate import (
    BDRV_FIX_ERRORS,
    BDRV_FIX_LEAKS,
    EIO,
    CheckFailed,
    CheckState,
    Result,
)
from qcowlib.formats.qcow2.overlap import QCOW2_OL_ACTIVE_L1, QCOW2_OL_ACTIVE_L2

if TYPE_CHECKING:
    import numpy.typing as npt

    from qcowlib.formats.qcow2.tables import U64

    I64 = npt.NDArray[np.int64]

OFFSET_MASK: Final = _tables.OFFSET_MASK
COPIED: Final = _tables.OFLAG_COPIED
#: L1 entries handled in one step (bounds the temporary arrays of a huge table).
CHUNK_ENTRIES: Final = 1 << 18


@dataclass
class _Table:
    """The data clusters of one L2 table whose flag disagrees with their refcount."""

    table: U64
    wrong: I64  # indexes of the entries
    refcounts: list[int]
    error_blocks: list[int]  # refcount blocks whose lookup failed (signal corruption)


def check_oflag_copied(chk: CheckState, res: Result, fix: int) -> None:
    """check_oflag_copied."""
    if fix & BDRV_FIX_ERRORS:
        repair = True
    elif fix & BDRV_FIX_LEAKS:
        repair = not (res.check_errors or res.corruptions or res.leaks)
    else:
        repair = False
    used = np.flatnonzero(chk.l1_table & np.uint64(OFFSET_MASK))
    for lo in range(0, used.size, CHUNK_ENTRIES):
        _check_entries(chk, res, used[lo : lo + CHUNK_ENTRIES], repair)


def _check_entries(chk: CheckState, res: Result, used: I64, repair: bool) -> None:
    """check_oflag_copied for the active L1 entries ``used`` (by index), in order."""
    u = np.uint64
    store = chk.refcounts
    entries = chk.l1_table[used]
    l2 = entries & u(OFFSET_MASK)
    l2_refcounts, l2_errors = store.get(l2 >> u(chk.cluster_bits), signal=False)
    l1_bad = ~l2_errors & ((l2_refcounts == 1) != ((entries & u(COPIED)) != 0))
    readable = ~l2_errors & (l2 < u(chk.host.size))  # past the end: zeros, no entries
    offsets, which_readable = np.unique(l2[readable], return_inverse=True)
    found = [_scan_table(chk, int(offset)) for offset in offsets.tolist()]
    which = np.full(used.size, offsets.size, dtype=np.int64)  # the last: no table
    which[readable] = which_readable
    n_wrong = np.array([t.wrong.size for t in found] + [0], dtype=np.int64)
    noisy_table = np.array([bool(t.wrong.size or t.error_blocks) for t in found] + [False])
    res.corruptions += int(l1_bad.sum()) + int(n_wrong[which].sum())
    noisy = l1_bad | (n_wrong[which] != 0)
    interesting = np.flatnonzero(l2_errors | noisy | noisy_table[which]).tolist()
    for k, n in enumerate(interesting):
        if not noisy[n] and chk.signaled_corruption:
            continue  # it would only signal again, which QEMU suppresses
        if not repair and chk.messages.room <= 0:
            rest = interesting[k:]
            chk.messages.drop(int(l1_bad[rest].sum() + n_wrong[which[rest]].sum()))
            break
        l2_offset = int(l2[n])
        if l2_errors[n]:
            store.block_offset((l2_offset >> chk.cluster_bits) >> store.block_bits)  # signals
            continue
        if l1_bad[n]:
            _l1_entry(chk, res, int(used[n]), int(entries[n]), int(l2_refcounts[n]), repair)
        j = int(which[n])
        if j == offsets.size:
            continue
        if repair:
            found[j] = _scan_table(chk, l2_offset)  # an earlier visit may have fixed it
        _data_entries(chk, res, l2_offset, found[j], repair)


def _scan_table(chk: CheckState, l2_offset: int) -> _Table:
    """Read an L2 table and find the allocated entries whose flag is wrong."""
    u = np.uint64
    table = chk.read_l2(l2_offset)
    entries = table[0 :: 2 if chk.extended else 1]
    compressed = (entries & u(_tables.OFLAG_COMPRESSED)) != 0
    off = entries & u(OFFSET_MASK)
    copied = (entries & u(COPIED)) != 0
    allocated = ~compressed & (off != 0)
    if chk.has_data_file:
        zflag = np.zeros(entries.size, dtype=bool)
        if not chk.extended:
            zflag = (entries & u(_tables.OFLAG_ZERO)) != 0
        allocated |= ~compressed & ~zflag & copied
    sel = np.flatnonzero(allocated)
    error_blocks: list[int] = []
    if chk.has_data_file:
        refcounts = np.ones(sel.size, dtype=u)
        ok = np.ones(sel.size, dtype=bool)
    else:
        clusters = off[sel] >> u(chk.cluster_bits)
        refcounts, errors = chk.refcounts.get(clusters, signal=False)
        ok = ~errors
        if errors.any():
            blocks = np.unique(clusters[errors] >> u(chk.refcounts.block_bits))
            error_blocks = blocks.astype(np.int64).tolist()
    wrong = ok & ((refcounts == 1) != copied[sel])
    return _Table(table, sel[wrong], refcounts[wrong].tolist(), error_blocks)


def _l1_entry(chk: CheckState, res: Result, index: int, entry: int, rc: int, repair: bool) -> None:
    word = "Repairing" if repair else "ERROR"
    chk.messages.add(
        f"{word} OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} refcount={rc}"
    )
    if not repair:
        return
    new = entry | COPIED if rc == 1 else entry & ~COPIED
    chk.l1_table[index] = new
    where = chk.h.l1_table_offset + 8 * index
    if not chk.pre_write_overlap_check(QCOW2_OL_ACTIVE_L1, where, 8):
        res.check_errors += 1
        raise CheckFailed(EIO)
    chk.write(where, struct.pack(">Q", new))
    res.corruptions -= 1
    res.corruptions_fixed += 1


def _data_entries(chk: CheckState, res: Result, l2_offset: int, t: _Table, repair: bool) -> None:
    for block in t.error_blocks:
        chk.refcounts.block_offset(block)  # signals the corruption (once)
    if not t.wrong.size:
        return
    word = "Repairing" if repair else "ERROR"
    step = 2 if chk.extended else 1
    for j, rc in zip(t.wrong.tolist(), t.refcounts, strict=True):
        entry = int(t.table[j * step])
        chk.messages.add(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}")
        if repair:
            t.table[j * step] = entry | COPIED if rc == 1 else entry & ~COPIED
    if not repair:
        return
    cs = chk.cluster_size
    if not chk.pre_write_overlap_check(QCOW2_OL_ACTIVE_L2, l2_offset, cs):
        chk.messages.add(f"ERROR: Could not write L2 table; metadata overlap check failed: {EIO}")
        res.check_errors += 1
        raise CheckFailed(EIO)
    chk.write(l2_offset, t.table.astype(">u8").tobytes())
    res.corruptions -= t.wrong.size
    res.corruptions_fixed += t.wrong.size
