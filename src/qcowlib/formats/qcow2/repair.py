"""What ``check -r`` changes: cluster allocation and freeing on the stored refcounts,
growing the file for a refcount block past its end, and rebuilding the refcount
structure from the in-memory refcount table (QEMU ``block/qcow2-refcount.c``:
``qcow2_alloc_clusters``, ``qcow2_free_clusters``, ``rebuild_refcount_structure``,
``alloc_clusters_imrt``, ``rebuild_refcounts_write_refblocks``).

Repairs change metadata only, never guest data, and every metadata write is overlap
checked first (:meth:`~qcowlib.formats.qcow2.checkstate.CheckState.pre_write_overlap_check`).
"""

from __future__ import annotations

from typing import Final

import numpy as np

from qcowlib.errors import QcowlibIOError
from qcowlib.formats.qcow2.checkstate import (
    EFBIG,
    EINVAL,
    EIO,
    INT64_MAX,
    MAX_CHECK_CLUSTERS,
    CheckFailed,
    CheckState,
    Result,
)
from qcowlib.formats.qcow2.hostio import write_fields
from qcowlib.formats.qcow2.imrt import Imrt
from qcowlib.formats.qcow2.refcount import encode_block

#: How far ``-r all`` extends a file to reach a refcount block past its end: QEMU
#: extends to any offset; beyond this the block is dropped and the refcount structure
#: rebuilt instead, so that a corrupt offset cannot create a huge sparse file.
MAX_REPAIR_GROWTH: Final = 1 << 30


def alloc_clusters(chk: CheckState, size: int) -> int | None:
    """qcow2_alloc_clusters, first fit on the stored refcounts from cluster 0.

    Returns None (allocating nothing) when the clusters found have no refcount block
    yet: creating one is not something a check needs to do.
    """
    if size <= 0:
        return None
    store = chk.refcounts
    count = -(-size // chk.cluster_size)
    start = store.find_free(count, 0)
    blocks = range(start >> store.block_bits, ((start + count - 1) >> store.block_bits) + 1)
    if any(not store.block_offset(b) for b in blocks):
        return None
    for c in range(start, start + count):
        store.set(c, 1)
    chk.flush_refblocks()
    return start * chk.cluster_size


def free_clusters(chk: CheckState, offset: int, size: int) -> None:
    """qcow2_free_clusters: drop one reference from each cluster of the range."""
    if size <= 0:
        return
    cb = chk.cluster_bits
    clusters = np.arange(offset >> cb, ((offset + size - 1) >> cb) + 1, dtype=np.uint64)
    values, errors = chk.refcounts.get(clusters)
    for c, v, bad in zip(clusters.tolist(), values.tolist(), errors.tolist(), strict=True):
        if not bad and v:
            chk.refcounts.set(c, v - 1)
    chk.flush_refblocks()


def discard_clusters(chk: CheckState, clusters: list[int]) -> None:
    """Punch holes where freed clusters were (QCOW2_DISCARD_ALWAYS), in runs."""
    if not chk.writable or not clusters:
        return
    cs = chk.cluster_size
    start = prev = clusters[0]
    for c in [*clusters[1:], -1]:
        if c != prev + 1:
            chk.host.punch_hole(start * cs, (prev - start + 1) * cs)
            start = c
        prev = c


def grow_for_refblock(chk: CheckState, offset: int, imrt: Imrt) -> str | None:
    """Extend the file so a refcount block past its end lies inside it (as QEMU's
    check_refblocks does); returns the errno text when that is impossible."""
    cs = chk.cluster_size
    if offset > INT64_MAX - cs:
        return EINVAL
    new_size = offset + cs
    if new_size - chk.host.size > MAX_REPAIR_GROWTH or -(-new_size // cs) > MAX_CHECK_CLUSTERS:
        # Refuse as a file system would; the refcount structure is rebuilt instead.
        chk.messages.add(f"Could not resize file: {EFBIG}")
        return EFBIG
    if new_size > chk.host.size:
        try:
            chk.host.truncate(new_size)
        except QcowlibIOError as exc:
            chk.messages.add(f"Could not resize file: {exc.message}")
            return exc.message
    imrt.resize(-(-chk.host.size // cs))
    return None


def _alloc_clusters_imrt(imrt: Imrt, count: int, first_free: int) -> tuple[int, int]:
    """alloc_clusters_imrt: ``(cluster, first_free_cluster)`` of ``count`` free clusters,
    found from ``first_free`` on (growing the IMRT past its end if needed)."""
    cluster = first_free
    size = imrt.size
    run_start = -1
    contiguous = 0
    if cluster < size:
        zeros = np.flatnonzero(imrt.counts[cluster:size] == 0)
        if zeros.size:
            first_free = cluster + int(zeros[0])
            # Starts and lengths of the runs of free clusters.
            breaks = np.flatnonzero(np.diff(zeros) != 1)
            starts = np.concatenate(([zeros[0]], zeros[breaks + 1]))
            ends = np.concatenate((zeros[breaks] + 1, [zeros[-1] + 1]))
            long_enough = np.flatnonzero(ends - starts >= count)
            if long_enough.size:
                run_start = cluster + int(starts[long_enough[0]])
            elif int(ends[-1]) == size - cluster:
                contiguous = int(ends[-1] - starts[-1])
        if run_start < 0:
            cluster = size
    if run_start < 0:
        imrt.resize(cluster + count - contiguous)
        run_start = cluster - contiguous
    imrt.counts[run_start : run_start + count] = 1
    return run_start, first_free


def _write_refblocks(
    chk: CheckState, imrt: Imrt, first_cluster: int, end_cluster: int, reftable: list[int]
) -> bool:
    """rebuild_refcounts_write_refblocks: returns whether ``reftable`` grew."""
    cs = chk.cluster_size
    bits = chk.refcounts.block_bits
    rbs = 1 << bits
    first_free = 0
    grown = False
    cluster = first_cluster
    while cluster < end_cluster:
        nz = np.flatnonzero(imrt.counts[cluster : min(end_cluster, imrt.size)])
        if nz.size == 0:
            break
        cluster += int(nz[0])
        index = cluster >> bits
        block_start = index << bits
        if index < len(reftable) and reftable[index]:
            offset = reftable[index]
        else:
            first_free = max(first_free, block_start)
            cluster_index, first_free = _alloc_clusters_imrt(imrt, 1, first_free)
            offset = cluster_index * cs
            end_cluster = max(end_cluster, cluster_index + 1)
            if len(reftable) <= index:
                entries = -(-((index + 1) * 8) // cs) * cs // 8
                reftable.extend([0] * (entries - len(reftable)))
                grown = True
            reftable[index] = offset
        if not chk.pre_write_overlap_check(0, offset, cs):
            chk.messages.add(f"ERROR writing refblock: {EIO}")
            raise CheckFailed(EIO)
        values = np.zeros(rbs, dtype=np.uint64)
        part = imrt.counts[block_start : min(block_start + rbs, imrt.size)]
        values[: part.size] = part
        chk.write(offset, encode_block(values, chk.refcount_order))
        cluster = block_start + rbs
    return grown


def rebuild_refcount_structure(chk: CheckState, res: Result, imrt: Imrt) -> None:
    """rebuild_refcount_structure: new refcount blocks and table from the IMRT.

    The old structure is leaked; the caller's second pass frees it.
    """
    cs = chk.cluster_size
    chk.refcounts.forget()
    reftable: list[int] = []
    try:
        _write_refblocks(chk, imrt, 0, imrt.size, reftable)
        while True:
            length = len(reftable) * 8
            clusters = -(-length // cs)
            start, _ = _alloc_clusters_imrt(imrt, clusters, 0)
            if not _write_refblocks(chk, imrt, start, start + clusters, reftable):
                break
    except CheckFailed:
        res.check_errors += 1
        raise
    offset = start * cs
    if not chk.pre_write_overlap_check(0, offset, length):
        chk.messages.add(f"ERROR writing reftable: {EIO}")
        raise CheckFailed(EIO)
    table = np.array(reftable, dtype=np.uint64)
    chk.write(offset, table.astype(">u8").tobytes())
    write_fields(chk.host, refcount_table_offset=offset, refcount_table_clusters=clusters)
    chk.refcounts.replace_table(table)
    chk.refcount_table_offset = offset
    chk.metadata_moved()
