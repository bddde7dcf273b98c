"""L1 and L2 tables and refcount blocks decoded in plain Python, for small ranges.

:mod:`~qcowlib.formats.qcow2.tables` decodes whole tables with numpy, and importing
numpy (~50 ms) costs more than a ``map`` of a small image takes.  The reader maps a
range with these functions instead when numpy is not loaded yet and the range has few
L2 tables (``reader_plain.PLAIN_L2_BYTES``).  They give exactly what the numpy codecs
give, the same runs or the same error (tests/formats/test_qcow2_tables_plain.py
compares both on arbitrary tables): the entry bits, run kinds and errors come from
:mod:`~qcowlib.formats.qcow2.entries`, shared with the numpy codec.

Entries that are zero (most of a sparse table) are skipped at C speed
(:func:`itertools.compress`); a Python step runs per non-zero entry only.
"""

from __future__ import annotations

import sys
from array import array
from itertools import compress
from typing import Final

from qcowlib.errors import CorruptImage
from qcowlib.formats.qcow2.entries import (
    KIND_COMPRESSED,
    KIND_DATA,
    KIND_UNALLOCATED,
    KIND_ZERO,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    SUBCLUSTER_ALLOC_MASK,
    SUBCLUSTERS,
    compressed_offset_bits,
    compressed_sectors_mask,
    compressed_with_bitmap,
    invalid_bitmap,
    unaligned_cluster,
    unaligned_l2_table,
)

__all__ = [
    "PlainL2Runs",
    "be_u64",
    "count_refcounts",
    "decode_l2_plain",
    "l1_check_aligned",
    "reftable_offsets",
]

_FULL_BITMAP: Final = SUBCLUSTER_ALLOC_MASK
#: Bits 0-30: where a subcluster's status differs from the next one's.
_SEAMS: Final = SUBCLUSTER_ALLOC_MASK >> 1


class PlainL2Runs:
    """:class:`~qcowlib.formats.qcow2.tables.L2Runs` as lists: runs of guest units
    (clusters, or subclusters with extended L2) in order, ``start`` and ``count`` in
    units, ``host`` the first unit's host offset (0: none), ``clen`` a compressed
    cluster's length bound."""

    __slots__ = ("clen", "count", "host", "kind", "start")

    def __init__(self) -> None:
        self.start: list[int] = []
        self.count: list[int] = []
        self.kind: list[int] = []
        self.host: list[int] = []
        self.clen: list[int] = []

    def __len__(self) -> int:
        return len(self.start)


def be_u64(raw: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit table entries as an ``array('Q')`` of native integers."""
    out = array("Q")
    out.frombytes(raw)
    if sys.byteorder == "little":
        out.byteswap()
    return out


def l1_check_aligned(raw_l1: bytes, cluster_size: int, *, table: str = "L1 table") -> None:
    """Raise what :func:`~qcowlib.formats.qcow2.tables.l1_offsets` raises for an L1
    entry that points at an unaligned L2 table; nothing when all are aligned."""
    mask = OFFSET_MASK & (cluster_size - 1)
    entries = be_u64(raw_l1)
    for i in compress(range(len(entries)), entries):
        if entries[i] & mask:
            raise unaligned_l2_table(entries[i] & OFFSET_MASK, table, i)


class _Runs:
    """Runs built unit block by unit block, merged as the numpy codec's ``_runs``: one
    kind, and host offsets that follow on (or no host offset at all)."""

    __slots__ = ("_kind", "_next", "out", "unit")

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.out = PlainL2Runs()
        self._kind = -1  # the open run's kind; -1: none can be continued
        self._next = 0  # the host offset a unit continuing it must have (0: none)

    def add(self, first: int, n: int, kind: int, host: int) -> None:
        """``n`` units from unit ``first``, of one kind, at host offsets from ``host``
        on (all without one when ``host`` is 0)."""
        out = self.out
        if kind == self._kind and host == self._next:
            out.count[-1] += n
        else:
            out.start.append(first)
            out.count.append(n)
            out.kind.append(kind)
            out.host.append(host)
            out.clen.append(0)
            self._kind = kind
        self._next = host + n * self.unit if host else 0

    def add_compressed(self, first: int, n: int, host: int, clen: int) -> None:
        """The ``n`` units of one compressed cluster: a run of their own."""
        out = self.out
        out.start.append(first)
        out.count.append(n)
        out.kind.append(KIND_COMPRESSED)
        out.host.append(host)
        out.clen.append(clen)
        self._kind = -1


def decode_l2_plain(
    raw: bytes | bytearray | memoryview,
    *,
    cluster_bits: int,
    extended: bool = False,
    has_data_file: bool = False,
    table: str = "L2 table",
) -> PlainL2Runs:
    """Decode one L2 table's bytes (entries and, with extended L2, their subcluster
    bitmaps) into runs: :func:`~qcowlib.formats.qcow2.tables.decode_l2` without numpy.

    Raises :class:`CorruptImage` as ``decode_l2`` does (the first problem of the kind it
    checks first): an unaligned data or preallocated zero cluster; with extended L2, a
    compressed cluster with a subcluster bitmap, then a bitmap QEMU refuses.
    """
    words = be_u64(raw)
    if extended:
        return _extended(words[0::2], words[1::2], cluster_bits, has_data_file, table)
    return _standard(words, cluster_bits, has_data_file, table)


def _compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """A compressed cluster descriptor's host offset and length bound (qcow2.txt
    "Compressed Clusters Descriptor"), as ``CompressedLayout.decode``."""
    offset_bits = compressed_offset_bits(cluster_bits)
    offset = entry & ((1 << offset_bits) - 1)
    sectors = ((entry >> offset_bits) & compressed_sectors_mask(cluster_bits)) + 1
    return offset, sectors * 512 - (offset & 511)


def _standard(
    entries: array[int], cluster_bits: int, has_data_file: bool, table: str
) -> PlainL2Runs:
    """Runs of standard L2 entries, one unit per cluster (QEMU's cluster types)."""
    runs = _Runs(1 << cluster_bits)
    misaligned = (1 << cluster_bits) - 1
    done = 0  # entries before this one are in the runs
    for i in compress(range(len(entries)), entries):
        if i > done:
            runs.add(done, i - done, KIND_UNALLOCATED, 0)
        done = i + 1
        entry = entries[i]
        if entry & OFLAG_COMPRESSED:
            runs.add_compressed(i, 1, *_compressed(entry, cluster_bits))
            continue
        host = entry & OFFSET_MASK
        if host & misaligned:  # a data or preallocated zero cluster
            raise unaligned_cluster(host, table, i)
        if entry & OFLAG_ZERO:
            kind = KIND_ZERO
        elif host or (has_data_file and entry & OFLAG_COPIED):
            # With an external data file, host offset 0 is valid when COPIED is set.
            kind = KIND_DATA
        else:
            kind = KIND_UNALLOCATED
        runs.add(i, 1, kind, host)
    if len(entries) > done:
        runs.add(done, len(entries) - done, KIND_UNALLOCATED, 0)
    return runs.out


def _extended(
    entries: array[int], bitmaps: array[int], cluster_bits: int, has_data_file: bool, table: str
) -> PlainL2Runs:
    """Runs of extended L2 entries, one unit per subcluster; the zero flag (bit 0) is
    reserved there, a cluster's status comes from its bitmap."""
    sc = (1 << cluster_bits) // SUBCLUSTERS
    runs = _Runs(sc)
    misaligned = (1 << cluster_bits) - 1
    # The first entry with each problem, raised in the order decode_l2 checks them.
    first_unaligned = first_compressed = first_invalid = -1
    done = 0
    used = list(map(int.__or__, entries, bitmaps))
    for i in compress(range(len(used)), used):
        if i > done:
            runs.add(done * SUBCLUSTERS, (i - done) * SUBCLUSTERS, KIND_UNALLOCATED, 0)
        done = i + 1
        entry, bitmap = entries[i], bitmaps[i]
        if entry & OFLAG_COMPRESSED:
            if bitmap and first_compressed < 0:
                first_compressed = i
            runs.add_compressed(i * SUBCLUSTERS, SUBCLUSTERS, *_compressed(entry, cluster_bits))
            continue
        host = entry & OFFSET_MASK
        if host & misaligned and first_unaligned < 0:
            first_unaligned = i
        allocated = bool(host) or (has_data_file and bool(entry & OFLAG_COPIED))
        alloc, zero = bitmap & SUBCLUSTER_ALLOC_MASK, bitmap >> 32
        if (alloc & zero or (alloc and not allocated)) and first_invalid < 0:
            first_invalid = i
        _subclusters(runs, i * SUBCLUSTERS, alloc, zero, host if allocated else None)
    if len(used) > done:
        runs.add(done * SUBCLUSTERS, (len(used) - done) * SUBCLUSTERS, KIND_UNALLOCATED, 0)
    if first_unaligned >= 0:
        raise unaligned_cluster(entries[first_unaligned] & OFFSET_MASK, table, first_unaligned)
    if first_compressed >= 0:
        raise compressed_with_bitmap(table, first_compressed)
    if first_invalid >= 0:
        raise invalid_bitmap(table, first_invalid)
    return runs.out


def _subclusters(runs: _Runs, first: int, alloc: int, zero: int, host: int | None) -> None:
    """The 32 subclusters of one cluster, a block per stretch of one status.

    ``host`` is the cluster's host offset (None: no host cluster).  Every subcluster of
    an allocated cluster keeps its host offset, as QEMU maps them
    (``QCOW2_SUBCLUSTER_ZERO_ALLOC`` and ``_UNALLOCATED_ALLOC`` are ``OFFSET_VALID``).
    """
    seams = ((alloc ^ (alloc >> 1)) | (zero ^ (zero >> 1))) & _SEAMS
    sc = runs.unit
    lo = 0
    while lo < SUBCLUSTERS:
        hi = (seams & -seams).bit_length() if seams else SUBCLUSTERS
        seams &= seams - 1
        bit = 1 << lo
        kind = KIND_DATA if alloc & bit else KIND_ZERO if zero & bit else KIND_UNALLOCATED
        at = 0 if host is None else host + lo * sc
        if at == 0 and host is not None and hi - lo > 1:
            # A data file's cluster at offset 0: only its first subcluster has no
            # offset (0), the next ones follow on from sc.
            runs.add(first + lo, 1, kind, 0)
            runs.add(first + lo + 1, hi - lo - 1, kind, sc)
        else:
            runs.add(first + lo, hi - lo, kind, at)
        lo = hi


def reftable_offsets(raw: bytes, cluster_size: int) -> array[int]:
    """Refcount block offsets from a refcount table's bytes (0: no block), raising what
    ``Qcow2Metadata.refcount_table`` raises for an unaligned one."""
    entries = be_u64(raw)
    for i in compress(range(len(entries)), entries):
        entries[i] &= REFT_OFFSET_MASK
        if entries[i] & (cluster_size - 1):
            raise CorruptImage(
                f"refcount table entry {i} is not cluster aligned",
                structure="refcount table",
                field=f"entry[{i}]",
            )
    return entries


#: ``array`` type codes of the refcount widths of whole bytes beyond one (16, 32, 64 bits).
_WIDE_CODES: Final = {
    order: next(code for code in "HILQ" if array(code).itemsize << 3 == 1 << order)
    for order in (4, 5, 6)
}
_NARROW_NONZERO: dict[int, bytes] = {}


def count_refcounts(raw: bytes, refcount_order: int, n: int) -> int:
    """How many of the first ``n`` refcounts of a refcount block are not zero (entries
    narrower than a byte packed least-significant bits first, as ``refcount.decode_block``
    reads them)."""
    if refcount_order == 3:
        return n - raw[:n].count(0)
    if refcount_order > 3:
        words = array(_WIDE_CODES[refcount_order])
        words.frombytes(raw[: n << (refcount_order - 3)])
        return n - words.count(0)
    width = 1 << refcount_order
    per_byte = 8 // width
    table = _NARROW_NONZERO.get(width)
    if table is None:  # per byte value: how many of its entries are not zero
        field = (1 << width) - 1
        table = bytes(
            sum(1 for k in range(per_byte) if (b >> (k * width)) & field) for b in range(256)
        )
        _NARROW_NONZERO[width] = table
    whole, rest = divmod(n, per_byte)
    count = sum(raw[:whole].translate(table))
    if rest:
        last = raw[whole]
        count += sum(1 for k in range(rest) if (last >> (k * width)) & ((1 << width) - 1))
    return count
