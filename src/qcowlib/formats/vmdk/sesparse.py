"""ESXi space-efficient sparse extents (seSparse): headers and grain map entries.

ESXi 6.5+ writes snapshot deltas of large disks as ``*-sesparse.vmdk`` extents, named by
a descriptor's ``SESPARSE`` extent line.  VMware does not document the layout; QEMU's
``vmdk_open_se_sparse`` reads it strictly, and so does this module.  All integers are
little-endian uint64, sizes and offsets in 512-byte sectors::

    sector 0  const header: magic 0xcafebabe, version 0x200000001, capacity,
              grain_size (8: 4 KiB grains), grain_table_size (64: 4096 entries),
              flags (0), reserved1..4 (0), then (offset, size) of the volatile header,
              journal header, journal, grain directory, grain tables, free bitmap,
              back map and grains; 304 zero bytes
    volatile  magic 0xcafecafe, free_gt_number, next_txn_seq_number, replay_journal
              (must be 0: a dirty journal is not replayed), 480 zero bytes

A directory entry is 0 (no table) or ``0x10000000_iiiiiiii``: grain table ``i`` at
``grain_tables_offset + i * 64``.  A grain table entry's top nibble says what it is:
0 unallocated (the entry must be 0), 1 unmapped or 2 zeroed (both read as zeros), 3
allocated: cluster ``((e >> 48) & 0xfff) | ((e & 0xffff_ffffffff) << 12)`` at sector
``grains_offset + cluster * 8``.  Anything else is an I/O error to QEMU.

Pure: nothing here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Final

import construct as cs

from qcowlib.errors import CorruptImage, FormatError, TruncatedImage, UnsupportedFeature
from qcowlib.formats._layout import parse_fixed as _parse
from qcowlib.formats.vmdk.cowd import VMDK_L1_SIZE_MAX
from qcowlib.formats.vmdk.header import SECTOR, VMDK_CAPACITY_MAX
from qcowlib.formats.vmdk.mapping import (
    GD_ERROR,
    GD_TABLE,
    GD_UNALLOC,
    RUN_DATA,
    RUN_ERROR,
    RUN_UNALLOC,
    RUN_ZERO,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U64 = npt.NDArray[np.uint64]
    I64 = npt.NDArray[np.int64]
    U8 = npt.NDArray[np.uint8]

SESPARSE_CONST_HEADER_MAGIC: Final = 0xCAFEBABE
SESPARSE_VOLATILE_HEADER_MAGIC: Final = 0xCAFECAFE
SESPARSE_VERSION: Final = 0x0000000200000001
#: The only grain size (sectors) and grain table size (sectors) QEMU accepts.
SESPARSE_GRAIN_SIZE: Final = 8
SESPARSE_GRAIN_TABLE_SIZE: Final = 64
SESPARSE_GTES_PER_GT: Final = SESPARSE_GRAIN_TABLE_SIZE * SECTOR // 8
#: Directory entries: 0x1 in the top nibble, the table number in the low 32 bits.
SESPARSE_GDE_ALLOCATED: Final = 0x1000000000000000
#: Grain table entry kinds (top nibble).
SESPARSE_GTE_UNMAPPED: Final = 0x1
SESPARSE_GTE_ZERO: Final = 0x2
SESPARSE_GTE_ALLOCATED: Final = 0x3
#: Beyond these a cluster number or grains offset cannot address a real file: kept
#: apart so that sector arithmetic stays inside int64.
_CLUSTER_MAX: Final = 1 << 50
_OFFSET_MAX: Final = 1 << 53

_U64 = cs.Int64ul
CONST_HEADER = cs.Struct(
    *(
        name / _U64
        for name in [
            "magic",
            "version",
            "capacity",
            "grain_size",
            "grain_table_size",
            "flags",
            "reserved1",
            "reserved2",
            "reserved3",
            "reserved4",
            "volatile_header_offset",
            "volatile_header_size",
            "journal_header_offset",
            "journal_header_size",
            "journal_offset",
            "journal_size",
            "grain_dir_offset",
            "grain_dir_size",
            "grain_tables_offset",
            "grain_tables_size",
            "free_bitmap_offset",
            "free_bitmap_size",
            "backmap_offset",
            "backmap_size",
            "grains_offset",
            "grains_size",
        ]
    ),
    "pad" / cs.Bytes(304),
)
VOLATILE_HEADER = cs.Struct(
    "magic" / _U64,
    "free_gt_number" / _U64,
    "next_txn_seq_number" / _U64,
    "replay_journal" / _U64,
    "pad" / cs.Bytes(480),
)
assert CONST_HEADER.sizeof() == SECTOR
assert VOLATILE_HEADER.sizeof() == SECTOR


@dataclass(frozen=True)
class SeSparseConstHeader:
    """The const header (QEMU's ``VMDKSESparseConstHeader``), values as stored."""

    magic: int = SESPARSE_CONST_HEADER_MAGIC
    version: int = SESPARSE_VERSION
    capacity: int = 0
    grain_size: int = SESPARSE_GRAIN_SIZE
    grain_table_size: int = SESPARSE_GRAIN_TABLE_SIZE
    flags: int = 0
    reserved1: int = 0
    reserved2: int = 0
    reserved3: int = 0
    reserved4: int = 0
    volatile_header_offset: int = 0
    volatile_header_size: int = 0
    journal_header_offset: int = 0
    journal_header_size: int = 0
    journal_offset: int = 0
    journal_size: int = 0
    grain_dir_offset: int = 0
    grain_dir_size: int = 0
    grain_tables_offset: int = 0
    grain_tables_size: int = 0
    free_bitmap_offset: int = 0
    free_bitmap_size: int = 0
    backmap_offset: int = 0
    backmap_size: int = 0
    grains_offset: int = 0
    grains_size: int = 0
    pad: bytes = bytes(304)

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def num_grains(self) -> int:
        return -(-self.capacity // self.grain_size)

    @property
    def num_gd_entries(self) -> int:
        """Directory entries (QEMU's ``l1_size``): the directory's own size."""
        return self.grain_dir_size * SECTOR // 8

    @property
    def gd_range(self) -> tuple[int, int]:
        return self.grain_dir_offset * SECTOR, self.num_gd_entries * 8


@dataclass(frozen=True)
class SeSparseVolatileHeader:
    """The volatile header (QEMU's ``VMDKSESparseVolatileHeader``)."""

    magic: int = SESPARSE_VOLATILE_HEADER_MAGIC
    free_gt_number: int = 0
    next_txn_seq_number: int = 0
    replay_journal: int = 0
    pad: bytes = bytes(480)


_AT: Final = {f.name: 8 * i for i, f in enumerate(fields(SeSparseConstHeader))}


def _const_err(
    cls: type[FormatError] | type[UnsupportedFeature], message: str, field: str, base: int
) -> FormatError | UnsupportedFeature:
    return cls(
        message, structure="vmdk sesparse const header", field=field, offset=base + _AT[field]
    )


def parse_const_header(
    data: bytes | bytearray | memoryview, file_size: int, *, offset: int = 0
) -> SeSparseConstHeader:
    """Parse and check a const header as QEMU's ``check_se_sparse_const_header``, with
    QEMU's messages, then its placement in a file of ``file_size`` bytes.

    Raises :class:`TruncatedImage`, :class:`FormatError` (bad magic),
    :class:`UnsupportedFeature` (version, grain size, grain table size, flags, reserved
    fields or padding other than QEMU's) or :class:`CorruptImage` (capacity above
    :data:`~qcowlib.formats.vmdk.header.VMDK_CAPACITY_MAX`, a directory of more than
    :data:`~qcowlib.formats.vmdk.cowd.VMDK_L1_SIZE_MAX` entries, or a volatile header or
    directory outside the file).
    """
    raw = _parse(CONST_HEADER, data, "vmdk sesparse const header", offset)
    h = SeSparseConstHeader(**{f.name: raw[f.name] for f in fields(SeSparseConstHeader)})
    if h.magic != SESPARSE_CONST_HEADER_MAGIC:
        raise _const_err(FormatError, f"Bad const header magic: {h.magic:#018x}", "magic", offset)
    checks: tuple[tuple[bool, str, str], ...] = (
        (h.version != SESPARSE_VERSION, f"Unsupported version: {h.version:#018x}", "version"),
        (h.grain_size != 8, f"Unsupported grain size: {h.grain_size}", "grain_size"),
        (
            h.grain_table_size != 64,
            f"Unsupported grain table size: {h.grain_table_size}",
            "grain_table_size",
        ),
        (h.flags != 0, f"Unsupported flags: {h.flags:#018x}", "flags"),
        (
            any((h.reserved1, h.reserved2, h.reserved3, h.reserved4)),
            "Unsupported reserved bits: "
            + " ".join(f"{v:#018x}" for v in (h.reserved1, h.reserved2, h.reserved3, h.reserved4)),
            "reserved1",
        ),
        (any(h.pad), "Unsupported non-zero const header padding", "pad"),
    )
    for failed, message, field in checks:
        if failed:
            raise _const_err(UnsupportedFeature, message, field, offset)
    _check_placement(h, file_size, offset)
    return h


def _check_placement(h: SeSparseConstHeader, file_size: int, offset: int) -> None:
    if h.capacity > VMDK_CAPACITY_MAX:
        raise _const_err(CorruptImage, f"capacity {h.capacity} is too large", "capacity", offset)
    if h.volatile_header_offset * SECTOR + SECTOR > file_size:
        raise _const_err(
            TruncatedImage,
            "volatile header lies past the end of the file",
            "volatile_header_offset",
            offset,
        )
    if h.num_gd_entries > VMDK_L1_SIZE_MAX:
        raise _const_err(
            CorruptImage, f"L1 size too big ({h.num_gd_entries})", "grain_dir_size", offset
        )
    start, length = h.gd_range
    if start + length > file_size:
        raise _const_err(
            TruncatedImage,
            f"grain directory ({h.num_gd_entries} entries at {start:#x}) extends past the "
            f"end of the file ({file_size} bytes)",
            "grain_dir_offset",
            offset,
        )
    for field in ("grain_tables_offset", "grains_offset"):
        if getattr(h, field) > _OFFSET_MAX:
            raise _const_err(CorruptImage, f"{field} is out of range", field, offset)


def parse_volatile_header(
    data: bytes | bytearray | memoryview, *, offset: int = 0
) -> SeSparseVolatileHeader:
    """Parse and check a volatile header as QEMU's ``check_se_sparse_volatile_header``.

    Raises :class:`TruncatedImage`, :class:`FormatError` (bad magic) or
    :class:`UnsupportedFeature` (a journal to replay, non-zero padding).
    """
    what = "vmdk sesparse volatile header"
    raw = _parse(VOLATILE_HEADER, data, what, offset)
    h = SeSparseVolatileHeader(
        raw.magic, raw.free_gt_number, raw.next_txn_seq_number, raw.replay_journal, raw.pad
    )
    if h.magic != SESPARSE_VOLATILE_HEADER_MAGIC:
        raise FormatError(
            f"Bad volatile header magic: {h.magic:#018x}",
            structure=what,
            field="magic",
            offset=offset,
        )
    if h.replay_journal:
        raise UnsupportedFeature(
            "Image is dirty, Replaying journal not supported",
            structure=what,
            field="replay_journal",
            offset=offset + 24,
        )
    if any(h.pad):
        raise UnsupportedFeature(
            "Unsupported non-zero volatile header padding",
            structure=what,
            field="pad",
            offset=offset + 32,
        )
    return h


def decode_entries(
    raw: bytes | bytearray | memoryview, count: int, *, what: str, offset: int
) -> U64:
    """``count`` little-endian uint64 entries as a native ``uint64`` array (a copy).

    Raises :class:`TruncatedImage` when ``raw`` is shorter.
    """
    import numpy as np

    if count < 0 or len(raw) < count * 8:
        raise TruncatedImage(f"{what} is truncated", structure=what, offset=offset)
    return np.frombuffer(raw, dtype=np.dtype("<u8"), count=count).astype(np.uint64)


def directory_tables(gd: U64, h: SeSparseConstHeader) -> tuple[U8, I64]:
    """Each directory entry's state (``GD_*`` of :mod:`~qcowlib.formats.vmdk.mapping`)
    and its grain table's sector (0 unless :data:`GD_TABLE`)."""
    import numpy as np

    top = gd & np.uint64(0xFFFFFFFF00000000)
    index = (gd & np.uint64(0xFFFFFFFF)).astype(np.int64)
    sector = h.grain_tables_offset + index * SESPARSE_GRAIN_TABLE_SIZE
    ok = (top == np.uint64(SESPARSE_GDE_ALLOCATED)) & (sector <= 0xFFFFFFFF)
    state = np.where(gd == 0, GD_UNALLOC, np.where(ok, GD_TABLE, GD_ERROR)).astype(np.uint8)
    return state, np.where(state == GD_TABLE, sector, 0).astype(np.int64)


def grain_entries(gt: U64, h: SeSparseConstHeader) -> tuple[U8, I64]:
    """Each grain table entry's run kind (``RUN_*``) and, for data, its sector.

    A cluster number too large for any file gets a sector past every file's end, so the
    reader refuses it and the check reports it.
    """
    import numpy as np

    top = (gt >> np.uint64(60)).astype(np.int64)
    kind = np.full(gt.size, RUN_ERROR, dtype=np.uint8)
    kind[gt == 0] = RUN_UNALLOC
    kind[(top == SESPARSE_GTE_UNMAPPED) | (top == SESPARSE_GTE_ZERO)] = RUN_ZERO
    data = top == SESPARSE_GTE_ALLOCATED
    kind[data] = RUN_DATA
    cluster = ((gt >> np.uint64(48)) & np.uint64(0xFFF)) | (
        (gt & np.uint64(0xFFFFFFFFFFFF)) << np.uint64(12)
    )
    cluster = np.minimum(cluster, np.uint64(_CLUSTER_MAX)).astype(np.int64)
    sector = np.where(data, h.grains_offset + cluster * h.grain_size, 0).astype(np.int64)
    return kind, sector


def build_const_header(h: SeSparseConstHeader) -> bytes:
    """The const header sector for ``h``.  Raises :class:`CorruptImage` on a bad value."""
    try:
        out: bytes = CONST_HEADER.build({f.name: getattr(h, f.name) for f in fields(h)})
    except cs.ConstructError as exc:
        raise CorruptImage(
            f"cannot build seSparse header: {exc}", structure="vmdk sesparse"
        ) from None
    return out


def build_volatile_header(h: SeSparseVolatileHeader) -> bytes:
    """The volatile header sector for ``h``.  Raises :class:`CorruptImage` on a bad value."""
    try:
        out: bytes = VOLATILE_HEADER.build({f.name: getattr(h, f.name) for f in fields(h)})
    except cs.ConstructError as exc:
        raise CorruptImage(
            f"cannot build seSparse header: {exc}", structure="vmdk sesparse"
        ) from None
    return out
