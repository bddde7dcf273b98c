"""Mapping a small range of a qcow2 image without numpy (a mixin of the reader).

``map`` of a small image would spend most of its time importing numpy (~50 ms of a
~100 ms run) to decode two or three L2 tables.  So while numpy is not loaded, a range
whose L2 tables are small (at most :data:`PLAIN_L2_BYTES` of them, counted over the
image's life: a chain's repeated walks of a backing layer add up) is decoded from the raw L1
table by :func:`~qcowlib.formats.qcow2.tables_plain.decode_l2_plain`.  Everything else,
and everything once numpy is loaded, takes the numpy path unchanged.

Both paths give the same extents and raise the same error: the plain one checks the L2
table offsets with the same method, reads and decodes the tables in the same order
(standard tables in batches from the first one missing, as ``_load_l2_batch``; extended
ones one at a time) and its decoder matches the numpy codec's.
"""

from __future__ import annotations

import _thread
import sys
from collections import OrderedDict
from itertools import compress
from typing import TYPE_CHECKING, Final

from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, QcowlibError, TruncatedImage
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2.entries import OFFSET_MASK
from qcowlib.formats.qcow2.tables_plain import PlainL2Runs, be_u64, decode_l2_plain

if TYPE_CHECKING:
    from qcowlib.formats.qcow2 import tables

#: L2 table bytes the plain path decodes per image, beyond which numpy's path is cheaper:
#: 64 Ki standard entries (8 tables of 64 KiB clusters, 4 GiB of guest space) or 32 Ki
#: extended ones.  A Python step per entry in use costs ~0.4 us (up to ~3 us for an
#: extended entry whose bitmap changes status at every other subcluster) and one per
#: unused entry ~25 ns, against 50-90 ms for importing numpy: a small image maps in a
#: few milliseconds, full tables up to the cap in ~30 ms.
PLAIN_L2_BYTES: Final = 512 * 1024
#: Refcount table entries the plain path checks (a Python step per block in use) when it
#: counts the refcounts for QEMU's metadata-preallocation test; the refcounts themselves
#: are counted at C speed.  64 Ki blocks of 64 KiB clusters cover 128 TiB of file.
PLAIN_REFTABLE_ENTRIES: Final = 1 << 16
#: Raw L2 table bytes decoded in one vectorised step when a range spans many tables
#: (512 tables of 4 KiB clusters, 32 of 64 KiB; large clusters go one at a time).
L2_BATCH_BYTES = 2 * 1024 * 1024
_L1_ENTRY_SIZE = 8


def numpy_loaded() -> bool:
    """Whether numpy is imported already (then its table codecs cost nothing more).

    Called through the module, so that tests can patch it to take either path."""
    return "numpy" in sys.modules


class PlainL2Mixin:
    """The plain path's L2 tables of one image, and what both paths share."""

    host: HostFile
    header: hdr.Header
    filename: str
    cluster_size: int
    cluster_bits: int
    extended_l2: bool
    l2_span: int
    _raw_l1: bytes
    _l2_offsets: tables.U64 | None
    _l2_cache_max: int
    _l2_lock: _thread.LockType
    _l2_cache: OrderedDict[int, tables.L2Runs]
    #: Tables decoded by the plain path, kept for the image's life (the budget bounds them).
    _l2_plain: dict[int, PlainL2Runs]
    #: L2 table bytes the plain path may still decode for this image.
    _plain_budget: int

    def _plain_ok(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` is mapped by the plain path: numpy is not loaded and
        the L2 tables the range needs that are not decoded yet fit the budget.  Once
        the L1 table is decoded (by numpy) the raw one is gone: numpy's path then."""
        if numpy_loaded() or end <= start or not self._raw_l1:
            return False
        first, last = start // self.l2_span, (end - 1) // self.l2_span
        l1 = be_u64(self._raw_l1[first * _L1_ENTRY_SIZE : (last + 1) * _L1_ENTRY_SIZE])
        need = sum(1 for i in compress(range(len(l1)), l1) if first + i not in self._l2_plain)
        return need * self.cluster_size <= self._plain_budget

    def _forget_l2(self, l1_index: int | None = None) -> None:
        """Drop the decoded L2 tables of both paths (all, or one) after they changed."""
        with self._l2_lock:
            if l1_index is None:
                self._l2_cache.clear()
                self._l2_plain.clear()
            else:
                self._l2_cache.pop(l1_index, None)
                self._l2_plain.pop(l1_index, None)

    def _raw_l2_offset(self, l1_index: int) -> int:
        """The L2 table offset of an L1 entry, read from the raw L1 table; once the numpy
        path has decoded the L1 table (which drops the raw bytes, and writers change),
        from its array: a plain walk under way (another thread, a ``layer_runs`` call
        between two tables) goes on with the current offsets."""
        decoded = self._l2_offsets
        if decoded is not None:
            return int(decoded[l1_index]) if l1_index < decoded.size else 0
        at = l1_index * _L1_ENTRY_SIZE
        return int.from_bytes(self._raw_l1[at : at + _L1_ENTRY_SIZE], "big") & OFFSET_MASK

    def _l1_entries(self) -> int:
        decoded = self._l2_offsets
        return int(decoded.size) if decoded is not None else len(self._raw_l1) // _L1_ENTRY_SIZE

    def _check_l2_offset(self, l1_index: int, offset: int) -> None:
        """Refuse an L2 table past the end of the file or over the header."""
        what = f"L2 table {l1_index}"
        if offset + self.cluster_size > self.host.size:
            raise TruncatedImage(
                f"{what} at {offset:#x} is past the end of the file",
                file=self.filename,
                structure="L1 table",
                field=f"entry[{l1_index}]",
                offset=self.header.l1_table_offset + 8 * l1_index,
            )
        if offset < self.cluster_size:
            raise CorruptImage(
                f"{what} overlaps the header",
                file=self.filename,
                structure="L1 table",
                field=f"entry[{l1_index}]",
                offset=self.header.l1_table_offset + 8 * l1_index,
            )

    def _batch_last(self, first: int, last: int, l1_size: int) -> int:
        """The last table of the batch decoded from ``first`` on a miss."""
        batch = max(1, min(L2_BATCH_BYTES // self.cluster_size, self._l2_cache_max // 2))
        return min(last, first + batch - 1, l1_size - 1)

    def _plain_runs_ahead(self, l1_index: int, last_index: int) -> PlainL2Runs:
        """``_l2_runs_ahead`` on the plain path (``l1_index`` points at a table)."""
        with self._l2_lock:
            if l1_index not in self._l2_plain and last_index > l1_index and not self.extended_l2:
                self._plain_batch(l1_index, last_index)
            return self._plain_table(l1_index)

    def _plain_batch(self, first: int, last: int) -> None:
        """``_load_l2_batch`` on the plain path: the usable tables missing in the batch
        are read, then decoded in order, and kept only when all of them decode."""
        cs = self.cluster_size
        last = self._batch_last(first, last, self._l1_entries())
        want = []
        for l1_index in range(first, last + 1):
            offset = self._raw_l2_offset(l1_index)
            # Offsets that are bad are left to the one-table path, which names the problem.
            if cs <= offset <= self.host.size - cs and l1_index not in self._l2_plain:
                want.append((l1_index, offset))
        if len(want) < 2:
            return
        raw = [self.host.pread(offset, cs) for _, offset in want]
        decoded = {i: self._decode_plain(i, r) for (i, _), r in zip(want, raw, strict=True)}
        self._l2_plain.update(decoded)

    def _plain_table(self, l1_index: int) -> PlainL2Runs:
        cached = self._l2_plain.get(l1_index)
        if cached is not None:
            return cached
        offset = self._raw_l2_offset(l1_index)
        self._check_l2_offset(l1_index, offset)
        runs = self._decode_plain(l1_index, self.host.pread(offset, self.cluster_size))
        self._l2_plain[l1_index] = runs
        return runs

    def _decode_plain(self, l1_index: int, raw: bytes) -> PlainL2Runs:
        self._plain_budget -= self.cluster_size
        try:
            return decode_l2_plain(
                raw,
                cluster_bits=self.cluster_bits,
                extended=self.extended_l2,
                has_data_file=self.header.has_data_file,
                table=f"L2 table {l1_index}",
            )
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
