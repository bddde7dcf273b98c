"""The refcount structure against the references counted: ``check_refblocks`` (each
refcount block is referenced once) and ``compare_refcounts`` (each stored refcount
equals the references; lower is a corruption, higher a leak), from QEMU
``block/qcow2-refcount.c``.

Both work on whole arrays: the refcount table at once, the clusters in windows of
whole refcount blocks.  Only the entries with something to report are visited, and
messages are made only while they are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np

from qcowlib.formats.qcow2.checkstate import (
    BDRV_FIX_ERRORS,
    BDRV_FIX_LEAKS,
    EIO,
    CheckState,
    Result,
    eof_message,
)
from qcowlib.formats.qcow2.imrt import Imrt
from qcowlib.formats.qcow2.refcount import REFT_OFFSET_MASK
from qcowlib.formats.qcow2.repair import discard_clusters, grow_for_refblock

if TYPE_CHECKING:
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]

REFT_RESERVED_MASK: Final = 0x1FF
#: Clusters compared per window in compare_refcounts.
COMPARE_WINDOW: Final = 1 << 22
_OVERFLOW_HINT: Final = (
    "Use qemu-img amend to increase the refcount entry width or qemu-img "
    "convert to create a clean copy if the image cannot be opened for writing"
)


def check_refblocks(chk: CheckState, res: Result, fix: int, imrt: Imrt) -> bool:
    """check_refblocks: account for each refcount block; returns ``rebuild``."""
    cs = chk.cluster_size
    table = chk.refcounts.table
    index = np.flatnonzero(table)
    entries = table[index]
    u = np.uint64
    offsets = entries & u(REFT_OFFSET_MASK)
    reserved = (entries & u(REFT_RESERVED_MASK)) != 0
    unaligned = ~reserved & ((offsets & u(cs - 1)) != 0)
    normal = ~reserved & ~unaligned
    outside = normal & ((offsets >> u(chk.cluster_bits)) >= u(imrt.size))
    normal &= ~outside
    clusters = (offsets[normal] >> u(chk.cluster_bits)).astype(np.int64)
    if (
        (fix & BDRV_FIX_ERRORS and outside.any())
        or (offsets[normal] >= u(chk.host.size)).any()
        or _may_overflow(chk, imrt, clusters)
    ):
        return _check_refblocks_in_order(chk, res, fix, imrt, index.tolist())
    # Each block's refcount after its own reference: what is there, plus the blocks
    # before it in the table that share its cluster.
    order = np.argsort(clusters, kind="stable")
    sorted_clusters = clusters[order]
    rank = np.empty(clusters.size, dtype=np.int64)
    rank[order] = np.arange(clusters.size) - np.searchsorted(sorted_clusters, sorted_clusters)
    values = np.zeros(index.size, dtype=np.int64)
    values[normal] = imrt.counts[clusters].astype(np.int64) + rank + 1
    np.add.at(imrt.counts, clusters, 1)
    shared = normal & (values != 1)
    res.corruptions += int(reserved.sum() + unaligned.sum() + outside.sum() + shared.sum())
    noisy = np.flatnonzero(reserved | unaligned | outside | shared)
    room = chk.messages.room
    for k in noisy[:room].tolist():
        i = int(index[k])
        if reserved[k]:
            chk.messages.add(f"ERROR refcount table entry {i} has reserved bits set")
        elif unaligned[k]:
            chk.messages.add(
                f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            )
        elif outside[k]:
            chk.messages.add(f"ERROR refcount block {i} is outside image")
        else:
            chk.messages.add(f"ERROR refcount block {i} refcount={int(values[k])}")
    chk.messages.drop(max(0, noisy.size - room))
    return bool(reserved.any() or unaligned.any() or shared.any())


def _may_overflow(chk: CheckState, imrt: Imrt, clusters: I64) -> bool:
    """Whether counting the refcount blocks could pass the refcount maximum."""
    if clusters.size == 0:
        return False
    uniq, counts = np.unique(clusters, return_counts=True)
    return bool((imrt.counts[uniq].astype(np.float64) + counts > chk.refcount_max).any())


def _check_refblocks_in_order(
    chk: CheckState, res: Result, fix: int, imrt: Imrt, indexes: list[int]
) -> bool:
    """check_refblocks entry by entry: when repairs grow the file as they go, or a
    block's refcount overflows."""
    rebuild = False
    cs = chk.cluster_size
    for i in indexes:
        entry = int(chk.refcounts.table[i])
        offset = entry & REFT_OFFSET_MASK
        cluster = offset >> chk.cluster_bits
        if entry & REFT_RESERVED_MASK:
            chk.messages.add(f"ERROR refcount table entry {i} has reserved bits set")
            res.corruptions += 1
            rebuild = True
            continue
        if offset & (cs - 1):
            chk.messages.add(
                f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            )
            res.corruptions += 1
            rebuild = True
            continue
        if cluster >= imrt.size:
            res.corruptions += 1
            fixing = bool(fix & BDRV_FIX_ERRORS)
            chk.messages.add(
                f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside image"
            )
            if fixing:
                error = grow_for_refblock(chk, offset, imrt)
                if error is None:
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    inc_now(chk, res, imrt, offset, cs)
                    continue
                rebuild = True
                chk.messages.add(f"ERROR could not resize image: {error}")
            continue
        if offset:
            inc_now(chk, res, imrt, offset, cs)
            value = int(imrt.counts[cluster])
            if value != 1:
                chk.messages.add(f"ERROR refcount block {i} refcount={value}")
                res.corruptions += 1
                rebuild = True
    return rebuild


def inc_now(chk: CheckState, res: Result, imrt: Imrt, offset: int, size: int) -> None:
    """qcow2_inc_refcounts_imrt applied directly (few references, in order)."""
    cs = chk.cluster_size
    if size <= 0:
        return
    if offset + size - chk.host.size >= cs:
        chk.messages.add(eof_message(offset, size))
        res.corruptions += 1
        return
    first, last = offset >> chk.cluster_bits, (offset + size - 1) >> chk.cluster_bits
    imrt.resize(last + 1)
    for k in range(first, last + 1):
        if int(imrt.counts[k]) == chk.refcount_max:
            chk.messages.add(f"ERROR: overflow cluster offset={k * cs:#x}")
            chk.messages.add(_OVERFLOW_HINT)
            res.corruptions += 1
            continue
        imrt.counts[k] += 1


def compare_refcounts(chk: CheckState, res: Result, fix: int, imrt: Imrt) -> tuple[bool, int]:
    """compare_refcounts: returns ``(rebuild, highest_cluster)``.

    Works through the clusters in windows of whole refcount blocks, so memory stays
    bounded by the IMRT itself.
    """
    n = imrt.size
    rbs = chk.refcounts.per_block
    window = max(rbs, COMPARE_WINDOW // rbs * rbs)
    highest = 0
    rebuild = False
    freed: list[int] = []
    for lo in range(0, n, window):
        hi = min(n, lo + window)
        stored, errors = chk.refcounts.stored_range(lo, hi)
        computed = imrt.counts[lo:hi]
        used = (stored != 0) | (computed != 0)
        mismatch = stored != computed
        if errors is not None:
            used &= ~errors
            mismatch &= ~errors
        nz = np.flatnonzero(used)
        if nz.size:
            highest = lo + int(nz[-1])
        events = np.flatnonzero(mismatch)
        if errors is not None:
            events = np.union1d(events, np.flatnonzero(errors))
        if events.size:
            rebuild |= _compare_events(chk, res, fix, lo, events, stored, computed, errors, freed)
    chk.flush_refblocks()
    if not (res.corruptions or res.check_errors or rebuild):
        # Only for an otherwise sound image: clusters that merely look leaked because
        # a broken table could not be followed keep their bytes.
        discard_clusters(chk, freed)
    return rebuild, highest


def _compare_events(
    chk: CheckState,
    res: Result,
    fix: int,
    lo: int,
    events: I64,
    stored: npt.NDArray[Any],
    computed: npt.NDArray[Any],
    errors: npt.NDArray[np.bool_] | None,
    freed: list[int],
) -> bool:
    """The clusters of one window whose refcount is wrong or unreadable, in order;
    returns whether the refcount structure needs a rebuild."""
    failed = errors[events] if errors is not None else np.zeros(events.size, dtype=bool)
    r1 = stored[events].astype(np.uint64)
    r2 = computed[events].astype(np.uint64)
    ok = ~failed
    rebuild = bool((ok & (r1 == 0)).any())
    fix_leak = ok & (r1 != 0) & (r1 > r2) & bool(fix & BDRV_FIX_LEAKS)
    fix_corr = ok & (r1 != 0) & (r1 < r2) & bool(fix & BDRV_FIX_ERRORS)
    fixed = fix_leak | fix_corr
    res.check_errors += int(failed.sum())
    res.leaks_fixed += int(fix_leak.sum())
    res.corruptions_fixed += int(fix_corr.sum())
    res.corruptions += int((ok & ~fixed & (r1 < r2)).sum())
    res.leaks += int((ok & ~fixed & (r1 > r2)).sum())
    for j in np.flatnonzero(fixed).tolist():
        cluster = lo + int(events[j])
        chk.refcounts.set(cluster, int(r2[j]))
        if r2[j] == 0:
            freed.append(cluster)
    room = chk.messages.room
    bits = chk.refcounts.block_bits
    for j in range(min(room, events.size)):
        i = lo + int(events[j])
        if failed[j]:
            chk.refcounts.block_offset(i >> bits)  # signals the corruption (once)
            chk.messages.add(f"Can't get refcount for cluster {i}: {EIO}")
            continue
        a, b = int(r1[j]), int(r2[j])
        word = "Repairing" if fixed[j] else ("ERROR" if a < b else "Leaked")
        chk.messages.add(f"{word} cluster {i} refcount={a} reference={b}")
    if room < events.size:
        chk.messages.drop(events.size - max(room, 0))
        rest = np.flatnonzero(failed[max(room, 0) :])
        if rest.size and not chk.signaled_corruption:
            chk.refcounts.block_offset((lo + int(events[room + int(rest[0])])) >> bits)
    return rebuild
