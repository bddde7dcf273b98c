"""The refcount model of an open qcow2 image: the refcount table, its blocks, lookups
and first-fit search (qcow2.txt "Host cluster management").

One :class:`RefcountStore` serves the in-place writer (``strict``: a refcount block that
is misplaced is an error) and ``check`` with its repairs (tolerant: a block past the end
of the file reads as zeros, a misaligned one is reported through ``on_unaligned`` and
its lookups fail, as QEMU's ``qcow2_get_refcount`` does).  Blocks are decoded whole with
numpy and kept in a bounded cache keyed by their offset; lookups of many clusters are
one array operation per block.  Writing is the caller's: :meth:`take_dirty` hands over
the blocks changed with :meth:`set`, and :func:`~qcowlib.formats.qcow2.refcount.encode_span`
encodes part of a block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from qcowlib.errors import CorruptImage
from qcowlib.formats.qcow2.refcount import REFT_OFFSET_MASK, decode_block, max_refcount

if TYPE_CHECKING:
    import numpy.typing as npt

    from qcowlib.formats.qcow2.hostio import HostIO
    from qcowlib.formats.qcow2.tables import U64

    Bools = npt.NDArray[np.bool_]
    Counts = npt.NDArray[Any]

__all__ = ["BDRV_MAX_LENGTH", "RefcountStore", "refcount_dtype"]

#: BDRV_MAX_LENGTH: QEMU's block layer fails reads and writes that end past this.
BDRV_MAX_LENGTH: Final = (2**63 - 1) & ~((1 << 30) - 1)
#: Decoded refcount blocks kept in memory (besides the ones changed and not yet taken).
CACHE_BLOCKS: Final = 1024
#: Clusters looked at per step of :meth:`RefcountStore.find_free` at most.
FIND_WINDOW: Final = 1 << 16


def refcount_dtype(refcount_order: int) -> np.dtype[Any]:
    """The narrowest unsigned dtype that holds a refcount of this width."""
    return np.dtype(
        (np.uint8, np.uint8, np.uint8, np.uint8, np.uint16, np.uint32, np.uint64)[refcount_order]
    )


class RefcountStore:
    """Stored refcounts, read through ``host`` from the table ``table`` (raw entries).

    ``table_entries`` is the table's size as the header gives it; ``table`` may be
    shorter when the rest lies past the end of the file (those entries are zero).
    """

    def __init__(
        self,
        host: HostIO,
        table: U64,
        cluster_bits: int,
        refcount_order: int,
        *,
        table_entries: int | None = None,
        strict: bool = False,
        on_unaligned: Callable[[int, int], None] | None = None,
    ) -> None:
        self.host = host
        self.table = table
        self.table_entries = table.size if table_entries is None else table_entries
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.block_bits = cluster_bits + 3 - refcount_order
        self.per_block = 1 << self.block_bits
        self.max_refcount = max_refcount(refcount_order)
        self.dtype = refcount_dtype(refcount_order)
        self.strict = strict
        self.on_unaligned = on_unaligned
        self._blocks: dict[int, Counts] = {}
        self._dirty: set[int] = set()

    # -- the table --------------------------------------------------------------------
    def replace_table(self, table: U64, entries: int | None = None) -> None:
        """Use a new refcount table (its blocks are looked up afresh)."""
        self.table = table
        self.table_entries = table.size if entries is None else entries

    def block_offset(self, index: int, *, signal: bool = True) -> int | None:
        """The offset of refcount block ``index``: 0 for none, None when it cannot be
        read (misaligned, or past the largest offset QEMU's block layer reads)."""
        if index >= self.table.size:
            return 0
        offset = int(self.table[index]) & REFT_OFFSET_MASK
        cs = self.cluster_size
        if offset & (cs - 1):
            if self.strict:
                raise CorruptImage(
                    f"refcount table entry {index} is not cluster aligned",
                    file=self.host.path,
                    structure="refcount table",
                )
            if signal and self.on_unaligned is not None:
                self.on_unaligned(offset, index)
            return None
        if offset + cs > BDRV_MAX_LENGTH:
            return None
        if self.strict and offset and offset + cs > self.host.size:
            raise CorruptImage(
                f"refcount block {index} is past the end of the file", file=self.host.path
            )
        return offset

    # -- blocks -------------------------------------------------------------------------
    def block(self, offset: int, *, keep: bool = True) -> Counts:
        """The refcounts of the block at ``offset`` (past the end of the file: zeros)."""
        block = self._blocks.get(offset)
        if block is None:
            if offset >= self.host.size:
                block = np.zeros(self.per_block, dtype=self.dtype)
            else:
                raw = self.host.pread(offset, self.cluster_size)
                block = decode_block(raw, self.refcount_order).astype(self.dtype)
            if keep:
                if len(self._blocks) >= CACHE_BLOCKS:
                    for k in [k for k in self._blocks if k not in self._dirty]:
                        del self._blocks[k]
                self._blocks[offset] = block
        return block

    def block_at(self, index: int) -> Counts | None:
        """Refcount block ``index`` (cached), or None where the table has none."""
        offset = self.block_offset(index)
        return self.block(offset) if offset else None

    def install(self, index: int, offset: int, block: Counts) -> None:
        """Point table entry ``index`` at a new block held in ``block`` (in memory only)."""
        self.table[index] = offset
        self._blocks[offset] = block

    def forget(self) -> None:
        """Drop every cached block (after the blocks were rewritten elsewhere)."""
        self._blocks.clear()
        self._dirty.clear()

    # -- lookups --------------------------------------------------------------------------
    def get_one(self, cluster: int) -> int:
        """One cluster's refcount (0 where no block covers it)."""
        block = self.block_at(cluster >> self.block_bits)
        return 0 if block is None else int(block[cluster & (self.per_block - 1)])

    def get(self, clusters: U64, *, signal: bool = True) -> tuple[U64, Bools]:
        """qcow2_get_refcount for many clusters: values and a mask of failed lookups."""
        values = np.zeros(clusters.size, dtype=np.uint64)
        errors = np.zeros(clusters.size, dtype=bool)
        if clusters.size == 0:
            return values, errors
        mask = np.uint64(self.per_block - 1)
        block_index = clusters >> np.uint64(self.block_bits)
        sel = np.flatnonzero(block_index < np.uint64(self.table.size))
        if sel.size == 0:
            return values, errors
        bidx = block_index[sel]
        order = np.argsort(bidx, kind="stable")
        sel, bidx = sel[order], bidx[order]
        uniq, starts = np.unique(bidx, return_index=True)
        ends = np.append(starts[1:], bidx.size)
        for b, s, e in zip(uniq.tolist(), starts.tolist(), ends.tolist(), strict=True):
            offset = self.block_offset(int(b), signal=signal)
            where = sel[s:e]
            if offset is None:
                errors[where] = True
            elif offset:
                values[where] = self.block(offset)[clusters[where] & mask]
        return values, errors

    def stored_range(self, lo: int, hi: int) -> tuple[Counts, Bools | None]:
        """Stored refcounts of clusters ``[lo, hi)`` and a mask of failed lookups (None
        when there are none); blocks only read here are not cached."""
        out = np.zeros(hi - lo, dtype=self.dtype)
        errors: Bools | None = None
        rbs = self.per_block
        first = lo // rbs
        last = min(-(-hi // rbs), self.table.size)
        offsets = self.table[first:last] & np.uint64(REFT_OFFSET_MASK)
        for b in (np.flatnonzero(offsets) + first).tolist():
            start, end = max(lo, b * rbs), min(hi, (b + 1) * rbs)
            offset = self.block_offset(b, signal=False)
            if offset is None:
                if errors is None:
                    errors = np.zeros(hi - lo, dtype=bool)
                errors[start - lo : end - lo] = True
                continue
            block = self.block(offset, keep=offset in self._blocks)
            out[start - lo : end - lo] = block[start - b * rbs : end - b * rbs]
        return out, errors

    def find_free(self, count: int, start: int = 0) -> int:
        """The first cluster from ``start`` on that begins ``count`` clusters with a
        stored refcount of 0 (clusters whose refcount cannot be read are in use).

        Clusters past the last refcount block are free, so this always finds a run;
        the search widens its window as it fails, one array operation per window.
        """
        lo, window, carried = start, max(count, 1), 0
        if count <= self.per_block - (start & (self.per_block - 1)):
            # Inside one block (the writer's usual case: the end of the file is free).
            offset = self.block_offset(start >> self.block_bits, signal=False)
            if offset == 0:
                return start
            if offset is not None:
                i = start & (self.per_block - 1)
                if not self.block(offset)[i : i + count].any():
                    return start
        while True:
            stored, errors = self.stored_range(lo, lo + window)
            free = stored == 0
            if errors is not None:
                free &= ~errors
            ext = np.concatenate((np.ones(carried, dtype=bool), free))
            total = np.concatenate(([0], np.cumsum(ext, dtype=np.int64)))
            hits = np.flatnonzero(total[count:] - total[:-count] == count)
            if hits.size:
                return lo - carried + int(hits[0])
            busy = np.flatnonzero(~ext)
            carried = min(count - 1, ext.size - 1 - int(busy[-1]))
            lo += window
            window = max(count, min(window * 4, FIND_WINDOW))

    # -- changes --------------------------------------------------------------------------
    def set(self, cluster: int, value: int) -> None:
        """Set one cluster's stored refcount in memory (its block must exist)."""
        offset = self.block_offset(cluster >> self.block_bits)
        if not offset:
            raise CorruptImage(f"no refcount block for cluster {cluster}", file=self.host.path)
        self.block(offset)[cluster & (self.per_block - 1)] = value
        self._dirty.add(offset)

    def take_dirty(self) -> list[tuple[int, Counts]]:
        """The blocks changed by :meth:`set` since the last call, by offset, to write."""
        out = [(offset, self._blocks[offset]) for offset in sorted(self._dirty)]
        self._dirty.clear()
        return out
