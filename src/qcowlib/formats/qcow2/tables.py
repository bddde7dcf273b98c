"""L1 and L2 table codecs over whole tables with numpy (qcow2.txt, "Cluster mapping").

An L2 table is decoded into *runs*: maximal stretches of guest units (clusters, or
subclusters with extended L2) of one kind whose host offsets are contiguous.  Each
compressed cluster is a run of its own, because each is decompressed on its own.  No
Python loop touches single entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from qcowlib.errors import CorruptImage
from qcowlib.formats.qcow2 import entries as _entries

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

BE_U64: Final = np.dtype(">u8")

# The entry bits (declared in entries.py, which needs no numpy).
OFFSET_MASK: Final = _entries.OFFSET_MASK
L1E_RESERVED_MASK: Final = _entries.L1E_RESERVED_MASK
L2E_STD_RESERVED_MASK: Final = _entries.L2E_STD_RESERVED_MASK
OFLAG_COPIED: Final = _entries.OFLAG_COPIED
OFLAG_COMPRESSED: Final = _entries.OFLAG_COMPRESSED
OFLAG_ZERO: Final = _entries.OFLAG_ZERO
#: Subclusters per cluster with extended L2 entries.
SUBCLUSTERS: Final = _entries.SUBCLUSTERS
# Run kinds (small ints so they live in numpy arrays).
KIND_UNALLOCATED: Final = _entries.KIND_UNALLOCATED
KIND_DATA: Final = _entries.KIND_DATA
KIND_ZERO: Final = _entries.KIND_ZERO
KIND_COMPRESSED: Final = _entries.KIND_COMPRESSED


def decode_table(raw: bytes | bytearray | memoryview) -> U64:
    """Big-endian 64-bit entries to a native ``uint64`` array (a copy)."""
    return np.frombuffer(raw, dtype=BE_U64).astype(np.uint64)


def encode_table(entries: U64) -> bytes:
    """Native ``uint64`` entries to big-endian bytes."""
    return np.asarray(entries, dtype=np.uint64).astype(BE_U64).tobytes()


def l1_offsets(l1: U64, cluster_size: int, *, table: str = "L1 table") -> U64:
    """L2 table offsets from L1 entries, checking alignment (0 means no L2 table)."""
    offsets = l1 & np.uint64(OFFSET_MASK)
    bad = np.flatnonzero(offsets & np.uint64(cluster_size - 1))
    if bad.size:
        i = int(bad[0])
        raise _entries.unaligned_l2_table(int(offsets[i]), table, i)
    return offsets


@dataclass(frozen=True)
class CompressedLayout:
    """Where a compressed cluster descriptor splits (depends on cluster_bits)."""

    cluster_bits: int

    @property
    def offset_bits(self) -> int:
        """``x = 62 - (cluster_bits - 8)``: bits 0..x-1 hold the host offset."""
        return _entries.compressed_offset_bits(self.cluster_bits)

    @property
    def offset_mask(self) -> int:
        return (1 << self.offset_bits) - 1

    @property
    def sectors_mask(self) -> int:
        return _entries.compressed_sectors_mask(self.cluster_bits)

    def decode(self, entries: U64) -> tuple[U64, U64]:
        """Host offsets and compressed byte lengths (upper bounds) for descriptors."""
        e = entries.astype(np.uint64)
        offset = e & np.uint64(self.offset_mask)
        nb_csectors = ((e >> np.uint64(self.offset_bits)) & np.uint64(self.sectors_mask)) + 1
        length = nb_csectors * np.uint64(512) - (offset & np.uint64(511))
        return offset, length

    def encode(self, offsets: U64, lengths: U64) -> U64:
        """Descriptors for compressed data at ``offsets`` of ``lengths`` bytes."""
        o = offsets.astype(np.uint64)
        end = o + lengths.astype(np.uint64) - np.uint64(1)
        nb = (end >> np.uint64(9)) - (o >> np.uint64(9))
        if np.any(nb > np.uint64(self.sectors_mask)) or np.any(o > np.uint64(self.offset_mask)):
            raise CorruptImage("compressed cluster does not fit a descriptor")
        return (
            np.uint64(OFLAG_COMPRESSED)
            | (nb << np.uint64(self.offset_bits))
            | (o & np.uint64(self.offset_mask))
        )


@dataclass(frozen=True)
class L2Runs:
    """Runs decoded from (part of) an L2 table, in guest order.

    ``start`` and ``count`` are in units (clusters, or subclusters with extended L2),
    relative to the first entry decoded.  ``host`` is the host offset of the run's first
    unit (0 where none); for compressed runs ``clen`` holds the compressed length bound.
    """

    start: I64
    count: I64
    kind: U8
    host: U64
    clen: U64

    def __len__(self) -> int:
        return int(self.start.size)


def _unit_kinds_standard(
    entries: U64, *, has_data_file: bool, cluster_bits: int, extended: bool
) -> tuple[U8, U64, U64]:
    """Kind, host offset and compressed length per cluster (QEMU's cluster types).

    With extended L2 entries bit 0 is reserved, so the zero flag is not honoured.
    """
    compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
    if extended:
        zero = np.zeros(entries.shape, dtype=bool)
    else:
        zero = (entries & np.uint64(OFLAG_ZERO)) != 0
    host = entries & np.uint64(OFFSET_MASK)
    if has_data_file:
        # With an external data file, host offset 0 is valid when COPIED is set.
        allocated = (host != 0) | ((entries & np.uint64(OFLAG_COPIED)) != 0)
    else:
        allocated = host != 0
    kind = np.full(entries.shape, KIND_UNALLOCATED, dtype=np.uint8)
    kind[allocated] = KIND_DATA
    kind[zero] = KIND_ZERO
    host = np.where(zero & ~allocated, np.uint64(0), host)
    clen = np.zeros(entries.shape, dtype=np.uint64)
    if compressed.any():
        layout = CompressedLayout(cluster_bits)
        c_off, c_len = layout.decode(entries[compressed])
        kind[compressed] = KIND_COMPRESSED
        host[compressed] = c_off
        clen[compressed] = c_len
    return kind, host, clen


def _check_alignment(kind: U8, host: U64, cluster_size: int, table: str, first_index: int) -> None:
    aligned_kinds = (kind == KIND_DATA) | ((kind == KIND_ZERO) & (host != 0))
    bad = np.flatnonzero(aligned_kinds & ((host & np.uint64(cluster_size - 1)) != 0))
    if bad.size:
        i = int(bad[0])
        raise _entries.unaligned_cluster(int(host[i]), table, first_index + i)


def decode_l2(
    entries: U64,
    *,
    cluster_bits: int,
    bitmaps: U64 | None = None,
    has_data_file: bool = False,
    table: str = "L2 table",
    first_index: int = 0,
) -> L2Runs:
    """Decode L2 entries (and, with extended L2, their subcluster bitmaps) into runs.

    Raises :class:`CorruptImage` for unaligned host offsets, compressed clusters with a
    non-zero subcluster bitmap, or subclusters marked both allocated and zero.
    """
    cluster_size = 1 << cluster_bits
    kind, host, clen = _unit_kinds_standard(
        entries,
        has_data_file=has_data_file,
        cluster_bits=cluster_bits,
        extended=bitmaps is not None,
    )
    _check_alignment(kind, host, cluster_size, table, first_index)
    if bitmaps is None:
        return _runs(kind, host, clen, cluster_size)

    # Extended L2: the zero flag (bit 0) is reserved; status comes from the bitmap.
    _check_bitmaps(kind, bitmaps, table, first_index)
    return _subcluster_runs(kind, host, clen, bitmaps, cluster_size)


def _check_bitmaps(kind: U8, bitmaps: U64, table: str, first_index: int) -> None:
    """Refuse a compressed cluster with a bitmap, a subcluster both allocated and zero
    (as QEMU), and allocated subclusters in a cluster without a host cluster."""
    alloc_bits = bitmaps & np.uint64(_entries.SUBCLUSTER_ALLOC_MASK)
    zero_bits = bitmaps >> np.uint64(32)
    compressed = kind == KIND_COMPRESSED
    if np.any(compressed & (bitmaps != 0)):
        i = int(np.flatnonzero(compressed & (bitmaps != 0))[0])
        raise _entries.compressed_with_bitmap(table, first_index + i)
    both = (alloc_bits & zero_bits) != 0
    alloc_without_cluster = (kind != KIND_DATA) & (~compressed) & (alloc_bits != 0)
    bad = both | alloc_without_cluster
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _entries.invalid_bitmap(table, first_index + i)


def _subcluster_runs(kind: U8, host: U64, clen: U64, bitmaps: U64, cluster_size: int) -> L2Runs:
    """Runs of checked extended L2 entries, one unit per subcluster."""
    n = kind.size
    alloc_bits = (bitmaps & np.uint64(_entries.SUBCLUSTER_ALLOC_MASK)).astype(np.uint64)
    zero_bits = (bitmaps >> np.uint64(32)).astype(np.uint64)
    compressed = kind == KIND_COMPRESSED
    cluster_allocated = kind == KIND_DATA
    shifts = np.arange(SUBCLUSTERS, dtype=np.uint64)
    sub_alloc = ((alloc_bits[:, None] >> shifts) & np.uint64(1)).astype(bool)
    sub_zero = ((zero_bits[:, None] >> shifts) & np.uint64(1)).astype(bool)
    sc_size = cluster_size // SUBCLUSTERS
    ukind = np.full((n, SUBCLUSTERS), KIND_UNALLOCATED, dtype=np.uint8)
    ukind[sub_alloc] = KIND_DATA
    ukind[sub_zero] = KIND_ZERO
    ukind[compressed, :] = KIND_COMPRESSED
    base = np.where(cluster_allocated | compressed, host, np.uint64(0))
    uhost = base[:, None] + shifts * np.uint64(sc_size)
    # Every subcluster of an allocated cluster keeps its host offset, as QEMU maps them
    # (QCOW2_SUBCLUSTER_ZERO_ALLOC and _UNALLOCATED_ALLOC are OFFSET_VALID).
    keep = (ukind == KIND_DATA) | cluster_allocated[:, None]
    uhost = np.where(keep, uhost, np.uint64(0))
    uhost[compressed, :] = host[compressed, None]
    uclen = np.zeros((n, SUBCLUSTERS), dtype=np.uint64)
    uclen[compressed, :] = clen[compressed, None]
    return _runs(
        ukind.reshape(-1), uhost.reshape(-1), uclen.reshape(-1), sc_size, compressed_group=32
    )


def decode_l2_tables(
    entries: U64,
    *,
    cluster_bits: int,
    has_data_file: bool = False,
    tables: list[str],
) -> list[L2Runs]:
    """Decode several standard (non-extended) L2 tables at once, one row each.

    The same result as :func:`decode_l2` on every row, with the numpy work done once for
    all of them (per-table overhead dominates on small clusters: a 16 GiB image of 4 KiB
    clusters has 8192 tables).  ``tables`` names the rows for errors.

    Raises :class:`CorruptImage` for an unaligned host offset, naming its table and entry.
    """
    n_tables, per_table = entries.shape
    flat = entries.reshape(-1)
    kind, host, clen = _unit_kinds_standard(
        flat, has_data_file=has_data_file, cluster_bits=cluster_bits, extended=False
    )
    aligned_kinds = (kind == KIND_DATA) | ((kind == KIND_ZERO) & (host != 0))
    bad = np.flatnonzero(aligned_kinds & ((host & np.uint64((1 << cluster_bits) - 1)) != 0))
    if bad.size:
        t, i = divmod(int(bad[0]), per_table)
        raise _entries.unaligned_cluster(int(host[bad[0]]), tables[t], i)
    runs = _runs(kind, host, clen, 1 << cluster_bits, period=per_table)
    # Every table starts a run (``period``), so each table's runs are one slice.
    bounds = np.searchsorted(runs.start, np.arange(n_tables + 1) * per_table).tolist()
    out = []
    for t in range(n_tables):
        a, b = bounds[t], bounds[t + 1]
        out.append(
            L2Runs(
                runs.start[a:b] - t * per_table,
                runs.count[a:b],
                runs.kind[a:b],
                runs.host[a:b],
                runs.clen[a:b],
            )
        )
    return out


def _runs(
    kind: U8,
    host: U64,
    clen: U64,
    unit: int,
    compressed_group: int = 1,
    period: int | None = None,
) -> L2Runs:
    """Merge per-unit values into runs (vectorised boundary detection).

    With ``period``, a run also starts at every multiple of it (rows of several tables).
    """
    n = kind.size
    if n == 0:
        empty_i = np.zeros(0, dtype=np.int64)
        return L2Runs(
            empty_i, empty_i, np.zeros(0, np.uint8), np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        )
    boundary = np.ones(n, dtype=bool)
    if n > 1:
        same_kind = kind[1:] == kind[:-1]
        has_host = host != 0
        contiguous = host[1:] == host[:-1] + np.uint64(unit)
        both = has_host[1:] & has_host[:-1]
        neither = ~(has_host[1:] | has_host[:-1])
        host_ok = np.where(both, contiguous, neither)
        # Each compressed cluster stays a run of its own (its units share one host).
        idx = np.arange(1, n)
        compressed_ok = (idx % compressed_group) != 0
        cont = same_kind & np.where(kind[1:] == KIND_COMPRESSED, compressed_ok, host_ok)
        if period is not None:
            cont &= (idx % period) != 0
        boundary[1:] = ~cont
    starts = np.flatnonzero(boundary).astype(np.int64)
    counts = np.diff(np.append(starts, n)).astype(np.int64)
    return L2Runs(starts, counts, kind[starts], host[starts], clen[starts])


def encode_l2_standard(kind: U8, host: U64, *, copied: bool = True) -> U64:
    """Encode standard (non-extended) L2 entries for unallocated, data and zero clusters.

    Compressed entries are produced by :meth:`CompressedLayout.encode`.
    """
    out = np.zeros(kind.shape, dtype=np.uint64)
    data = kind == KIND_DATA
    zero = kind == KIND_ZERO
    out[data] = host[data] & np.uint64(OFFSET_MASK)
    out[zero] = (host[zero] & np.uint64(OFFSET_MASK)) | np.uint64(OFLAG_ZERO)
    if copied:
        with_host = (data | zero) & (host != 0)
        out[with_host] |= np.uint64(OFLAG_COPIED)
    return out


def referenced_clusters(entries: U64, cluster_bits: int) -> npt.NDArray[np.int64]:
    """Host clusters that standard L2 ``entries`` hold references to, one per reference:
    those of the uncompressed entries, then every cluster the compressed ones' bytes
    touch."""
    cs = np.uint64(1 << cluster_bits)
    compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
    plain = entries[~compressed] & np.uint64(OFFSET_MASK)
    out = [(plain[plain != 0] // cs).astype(np.int64)]
    if compressed.any():
        off, length = CompressedLayout(cluster_bits).decode(entries[compressed])
        first = (off // cs).astype(np.int64)
        span = ((off + length - np.uint64(1)) // cs).astype(np.int64) - first + 1
        starts = np.repeat(np.cumsum(span) - span, span)
        out.append(np.repeat(first, span) + np.arange(int(span.sum())) - starts)
    return np.concatenate(out)
