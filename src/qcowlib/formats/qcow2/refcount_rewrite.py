"""Changing the refcount width of an image in place (``amend -o refcount_bits=N``;
QEMU's ``qcow2_change_refcount_order``).

Every stored refcount is read, the old refcount structures are taken out of the count,
and a new refcount table with new blocks of the new width is written past the end of
the file (the new structures count themselves).  One header write switches to them;
the old table and blocks are then simply unreferenced in the new refcounts, so a crash
before the switch leaves the old structures in charge, and after it the new ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qcowlib.errors import InvalidArgument
from qcowlib.formats.qcow2.allocator import span
from qcowlib.formats.qcow2.hostio import write_header
from qcowlib.formats.qcow2.refcount import REFT_OFFSET_MASK, encode_block, max_refcount
from qcowlib.formats.qcow2.tables import encode_table

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.writer import Qcow2RWDisk

__all__ = ["change_refcount_order"]


def _stored_counts(disk: Qcow2RWDisk) -> np.ndarray:
    """Every cluster's stored refcount, without the refcount structures' own."""
    cs = disk.cluster_size
    store = disk.allocator.store
    last = max(disk.allocator.last_used() + 1, -(-disk.host.size // cs))
    counts, errors = store.stored_range(0, last)
    if errors is not None and errors.any():
        disk.signal_corruption("a refcount block cannot be read")
    out = counts.astype(np.uint64)
    h = disk.header
    own = list(span(h.refcount_table_offset, h.refcount_table_clusters * cs, cs))
    blocks = store.table & np.uint64(REFT_OFFSET_MASK)
    own += (blocks[blocks != 0] // np.uint64(cs)).astype(np.int64).tolist()
    for c in own:
        if c < out.size and out[c]:
            out[c] -= np.uint64(1)
    return out


def _area(start: int, used: int, per_block: int, cs: int) -> tuple[int, int]:
    """``(table clusters, blocks)`` for structures placed at cluster ``start`` that
    cover ``used`` clusters and themselves (the same fixpoint QEMU's loop reaches)."""
    t, k = 1, 0
    while True:
        end = max(used, start + t + k)
        k_new = -(-end // per_block)
        t_new = max(1, -(-k_new * 8 // cs))
        if (k_new, t_new) == (k, t):
            return t, k
        k, t = k_new, t_new


def change_refcount_order(disk: Qcow2RWDisk, order: int) -> None:
    """Rewrite the refcount structures with ``1 << order``-bit entries.  The writer is
    stale afterwards: close it.  Raises :class:`InvalidArgument` when some refcount
    does not fit the new width."""
    h = disk.header
    if order == h.refcount_order:
        return
    cs = disk.cluster_size
    counts = _stored_counts(disk)
    limit = max_refcount(order)
    too_big = np.flatnonzero(counts > np.uint64(limit))
    if too_big.size:
        c = int(too_big[0])
        raise InvalidArgument(
            f"Cannot decrease refcount entry width to {1 << order} bits: "
            f"Cluster at offset {c * cs:#x} has a refcount of {int(counts[c])}"
        )
    per_block = (cs * 8) >> order
    start = max(counts.size, disk.allocator.file_end // cs)
    t, k = _area(start, counts.size, per_block, cs)
    total = k * per_block
    full = np.zeros(total, dtype=np.uint64)
    full[: counts.size] = counts
    full[start : start + t + k] = 1
    table = np.zeros(t * cs // 8, dtype=np.uint64)
    blocks_at = start + t
    disk.host.truncate((start + t + k) * cs)
    for i in range(k):
        offset = (blocks_at + i) * cs
        table[i] = offset
        disk.check_overlap(offset, cs, None, "refcount block")
        disk.host.pwrite(offset, encode_block(full[i * per_block : (i + 1) * per_block], order))
    disk.check_overlap(start * cs, t * cs, None, "refcount table")
    disk.host.pwrite(start * cs, encode_table(table))
    disk.flush()
    new = h.replace(
        refcount_order=order, refcount_table_offset=start * cs, refcount_table_clusters=t
    )
    write_header(disk.host, new)
    disk.flush()
    disk.header = new
