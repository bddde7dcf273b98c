"""Host cluster management for writes into an existing qcow2 image (qcow2.txt "Host
cluster management"; QEMU's write discipline).

The :class:`Allocator` keeps the refcounts through a strict
:class:`~qcowlib.formats.qcow2.refcount_store.RefcountStore` (the same model ``check``
uses) and writes every change through at once, refcounts before the pointers that need
them: a crash leaks clusters at worst.  New refcount blocks go at the end of the file;
when the refcount table is full it moves to a larger place there.  Clusters are
allocated first-fit from the end of the file on, past any cluster that still carries a
refcount.  Every refcount block write is overlap checked by the owner.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn, Protocol

import numpy as np

from qcowlib.errors import QcowlibIOError
from qcowlib.formats.qcow2.header import MAX_REFTABLE_SIZE_BYTES
from qcowlib.formats.qcow2.hostio import write_fields
from qcowlib.formats.qcow2.refcount import encode_block, encode_span
from qcowlib.formats.qcow2.refcount_store import RefcountStore
from qcowlib.formats.qcow2.tables import encode_table

if TYPE_CHECKING:
    import numpy.typing as npt

    from qcowlib.formats.qcow2.header import Header
    from qcowlib.formats.qcow2.hostio import HostIO
    from qcowlib.formats.qcow2.tables import U64

__all__ = ["Allocator", "AllocatorOwner"]


class AllocatorOwner(Protocol):
    """What the allocator needs from the writer that owns it."""

    header: Header

    def check_overlap(self, offset: int, length: int, allowed: int | None, what: str) -> None:
        """Refuse (signal corruption) a write of ``what`` over metadata other than the
        cluster ``allowed``."""

    def signal_corruption(self, message: str) -> NoReturn:
        """Mark the image corrupt and raise."""

    def metadata_changed(self) -> None:
        """A refcount block or the refcount table moved or appeared."""

    def flush(self) -> None:
        """Make what was written durable."""


def span(offset: int, length: int, cs: int) -> range:
    """The clusters that ``[offset, offset + length)`` touches."""
    if length <= 0:
        return range(0)
    return range(offset // cs, (offset + length - 1) // cs + 1)


class Allocator:
    """Refcounts and allocation of an image open for writing."""

    def __init__(self, owner: AllocatorOwner, host: HostIO, reftable: U64) -> None:
        h = owner.header
        self.owner = owner
        self.host = host
        self.cluster_size = h.cluster_size
        self.refcount_order = h.refcount_order
        self.store = RefcountStore(host, reftable, h.cluster_bits, h.refcount_order, strict=True)
        self.per_block = self.store.per_block
        self.max_refcount = self.store.max_refcount
        #: Where the next cluster at the end of the file goes.
        self.file_end = -(-host.size // self.cluster_size) * self.cluster_size

    @property
    def reftable(self) -> U64:
        return self.store.table

    def get_refcount(self, cluster: int) -> int:
        return self.store.get_one(cluster)

    # -- changing refcounts ---------------------------------------------------------------
    def update(self, clusters: Iterable[int] | npt.NDArray[np.int64], delta: int) -> None:
        """Add ``delta`` to each cluster's refcount (once per occurrence), creating
        blocks as needed; block-at-a-time, each block written back once."""
        if not isinstance(clusters, np.ndarray):
            clusters = np.fromiter(clusters, dtype=np.int64)
        arr = np.sort(clusters.astype(np.int64))
        if arr.size == 0:
            return
        per = self.per_block
        if arr.size == 1:  # one cluster (most allocations): no grouping needed
            cluster = int(arr[0])
            index, i = divmod(cluster, per)
            block = self.store.block_at(index)
            if block is None:
                block = self._new_block(index)
            value = int(block[i]) + delta
            if value < 0 or value > self.max_refcount:
                self.owner.signal_corruption(f"refcount of cluster {cluster} would become {value}")
            block[i] = value
            self._write_block(index, block, i, i + 1)
            return
        bounds = np.flatnonzero(np.diff(arr // per)) + 1
        for part in np.split(arr, bounds):
            index = int(part[0]) // per
            block = self.store.block_at(index)
            if block is None:
                block = self._new_block(index)
            local, counts = np.unique(part % per, return_counts=True)
            step = counts.astype(np.uint64) * np.uint64(abs(delta))
            current = block[local].astype(np.uint64)
            if delta >= 0:
                bad = current > np.uint64(self.max_refcount) - step
            else:
                bad = current < step
            if bad.any():
                at = int(np.flatnonzero(bad)[0])
                cluster = index * per + int(local[at])
                value = int(current[at]) + int(counts[at]) * delta
                self.owner.signal_corruption(f"refcount of cluster {cluster} would become {value}")
            block[local] = current + step if delta >= 0 else current - step
            self._write_block(index, block, int(local[0]), int(local[-1]) + 1)

    def free(self, clusters: list[int] | npt.NDArray[np.int64]) -> None:
        """Drop one reference from each cluster (after the last pointer to it is gone)."""
        if len(clusters):
            self.update(clusters, -1)

    def _write_block(self, index: int, block: npt.NDArray[np.generic], lo: int, hi: int) -> None:
        """Write the bytes of refcount block ``index`` that hold entries ``lo..hi-1``."""
        offset = int(self.store.table[index])
        cs = self.cluster_size
        self.owner.check_overlap(offset, cs, offset // cs, "refcount block")
        first_byte, data = encode_span(block, lo, hi, self.refcount_order)
        self.host.pwrite(offset + first_byte, data)

    def _new_block(self, index: int) -> npt.NDArray[np.generic]:
        """Create refcount block ``index`` at the end of the file (it may cover itself)."""
        if index >= self.store.table.size:
            self._grow_reftable(index + 1)
            existing = self.store.block_at(index)
            if existing is not None:
                return existing
        cs = self.cluster_size
        offset = self.file_end
        self.file_end += cs
        block = np.zeros(self.per_block, dtype=self.store.dtype)
        own = offset // cs
        if own // self.per_block == index:
            block[own % self.per_block] = 1
        self.host.pwrite(offset, encode_block(block.astype(np.uint64), self.refcount_order))
        if own // self.per_block != index:
            self.update([own], 1)
        self.store.install(index, offset, block)
        self.owner.metadata_changed()
        table_offset = self.owner.header.refcount_table_offset
        self.host.pwrite(table_offset + 8 * index, offset.to_bytes(8, "big"))
        return block

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to a larger place at the end of the file.

        The new area holds the table and then the refcount blocks it needs beyond the
        old table's reach (they cover the area itself).  Order: blocks, refcounts of
        area clusters covered by old blocks, the table, header switch, then the old
        table's clusters are freed.
        """
        if min_entries > MAX_REFTABLE_SIZE_BYTES // 8:
            # QEMU's alloc_refcount_block: -EFBIG past QCOW_MAX_REFTABLE_SIZE.  A cluster
            # that far out is an L2 entry of a damaged image, or an image too large.
            raise QcowlibIOError(
                f"a refcount table of {min_entries} entries would exceed "
                f"{MAX_REFTABLE_SIZE_BYTES // (1 << 20)} MiB",
                errno=errno.EFBIG,
                structure="refcount table",
            )
        cs = self.cluster_size
        old = self.store.table
        start = self.file_end // cs
        want = min(max(min_entries, old.size * 2), MAX_REFTABLE_SIZE_BYTES // 8)
        t, k = self._reftable_area(start, want, old.size)
        area_end = start + t + k
        table = np.zeros(t * cs // 8, dtype=np.uint64)
        table[: old.size] = old
        self.store.replace_table(table)
        for j in range(k):
            index = old.size + j
            offset = (start + t + j) * cs
            block = np.zeros(self.per_block, dtype=self.store.dtype)
            lo = max(start, index * self.per_block)
            hi = min(area_end, (index + 1) * self.per_block)
            if lo < hi:
                block[lo - index * self.per_block : hi - index * self.per_block] = 1
            self.host.pwrite(offset, encode_block(block.astype(np.uint64), self.refcount_order))
            self.store.install(index, offset, block)
        self.file_end = area_end * cs
        self.owner.metadata_changed()
        covered = [c for c in range(start, area_end) if c // self.per_block < old.size]
        if covered:
            self.update(covered, 1)
        self.host.pwrite(start * cs, encode_table(table))
        self.owner.flush()
        header = self.owner.header
        old_offset, old_clusters = header.refcount_table_offset, header.refcount_table_clusters
        write_fields(self.host, refcount_table_offset=start * cs, refcount_table_clusters=t)
        self.owner.flush()
        self.owner.header = header.replace(
            refcount_table_offset=start * cs, refcount_table_clusters=t
        )
        self.owner.metadata_changed()
        self.update(list(span(old_offset, old_clusters * cs, cs)), -1)

    def _reftable_area(self, start: int, cap: int, old_entries: int) -> tuple[int, int]:
        """Clusters for a table of at least ``cap`` entries at cluster ``start`` and for
        the new refcount blocks that cover it: ``(table clusters, blocks)``."""
        cs = self.cluster_size
        while True:
            t = -(-cap * 8 // cs)
            k = 0
            while True:
                blocks_total = -(-(start + t + k) // self.per_block)
                k_new = max(0, blocks_total - old_entries)
                if k_new == k:
                    break
                k = k_new
            if blocks_total <= cap:
                return t, k
            cap = blocks_total

    # -- allocating -----------------------------------------------------------------------
    def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters at the end of the file; returns the offset.

        Clusters past the end of the file may still carry refcounts (an allocation cut
        short by a crash): those are never handed out again.
        """
        cs = self.cluster_size
        start = self.store.find_free(n, self.file_end // cs)
        offset = start * cs
        self.file_end = offset + n * cs
        self.update(np.arange(start, start + n, dtype=np.int64), 1)
        # Extend the file so the new clusters exist even before data lands in them.
        if self.file_end > self.host.size:
            try:
                self.host.truncate(self.file_end)
            except QcowlibIOError as exc:
                raise QcowlibIOError(
                    f"cannot extend image: {exc.message}", file=self.host.path
                ) from None
        return offset

    def last_used(self) -> int:
        """The last cluster with a refcount, or -1 (usually only the last block is read)."""
        for index in reversed(np.flatnonzero(self.store.table).tolist()):
            block = self.store.block_at(index)
            used = np.flatnonzero(block) if block is not None else np.zeros(0, dtype=np.int64)
            if used.size:
                return index * self.per_block + int(used[-1])
        return -1
