"""VMware 3 / ESX sparse extents (magic ``COWD``): header and grain directory.

An ESX ``vmfsSparse`` delta disk (``*-delta.vmdk``) keeps its data in one of these; a
descriptor names it as a ``VMFSSPARSE`` (or ``SPARSE``) extent.  QEMU's
``vmdk_open_vmfs_sparse`` reads the first 44 bytes of the header, all little-endian
uint32::

    0x00  magic "COWD"
    0x04  version, flags
    0x0c  disk_sectors      capacity of the extent, in sectors
    0x10  granularity       sectors per grain (ESX writes 1: 512-byte grains)
    0x14  l1dir_offset      sector of the grain directory
    0x18  l1dir_size        grain directory entries (uint32: a grain table's sector, 0: none)
    0x1c  file_sectors, cylinders, heads, sectors_per_track (ignored)

Every grain table has :data:`COWD_GTES_PER_GT` (4096) uint32 entries: a grain's sector,
or 0 (unallocated: read through the parent).  There is no zeroed-grain entry.  The
directory's size is its own, not derived from the capacity: grains past it are an I/O
error to QEMU.

Pure: nothing here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import construct as cs

from qcowlib.errors import CorruptImage, FormatError, TruncatedImage
from qcowlib.formats._layout import parse_fixed as _parse
from qcowlib.formats.vmdk.header import SECTOR, VMDK3_MAGIC

#: Entries of a COWD grain table (QEMU passes 4096 as the L2 size).
COWD_GTES_PER_GT: Final = 4096
#: QEMU refuses grains above 0x200000 sectors (1 GiB): "Invalid granularity".
COWD_GRANULARITY_MAX: Final = 0x200000
#: QEMU refuses directories above 32 Mi entries: "L1 size too big".
VMDK_L1_SIZE_MAX: Final = 32 * 1024 * 1024

COWD_HEADER = cs.Struct(
    "magic" / cs.Bytes(4),
    "version" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "disk_sectors" / cs.Int32ul,
    "granularity" / cs.Int32ul,
    "l1dir_offset" / cs.Int32ul,
    "l1dir_size" / cs.Int32ul,
    "file_sectors" / cs.Int32ul,
    "cylinders" / cs.Int32ul,
    "heads" / cs.Int32ul,
    "sectors_per_track" / cs.Int32ul,
)
COWD_HEADER_SIZE: Final = COWD_HEADER.sizeof()
assert COWD_HEADER_SIZE == 44

_AT: Final[dict[str, int]] = {"granularity": 0x10, "l1dir_offset": 0x14, "l1dir_size": 0x18}


@dataclass(frozen=True)
class CowdHeader:
    """A COWD extent header (QEMU's ``VMDK3Header``); sizes and offsets in sectors."""

    version: int
    flags: int
    disk_sectors: int
    granularity: int
    l1dir_offset: int
    l1dir_size: int
    file_sectors: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors_per_track: int = 0

    @property
    def capacity(self) -> int:
        return self.disk_sectors

    @property
    def grain_size(self) -> int:
        return self.granularity

    @property
    def grain_bytes(self) -> int:
        return self.granularity * SECTOR

    @property
    def num_grains(self) -> int:
        return -(-self.disk_sectors // self.granularity) if self.granularity else 0

    @property
    def gd_range(self) -> tuple[int, int]:
        """``(offset, length)`` in bytes of the grain directory."""
        return self.l1dir_offset * SECTOR, self.l1dir_size * 4


def _bad(cls: type[FormatError], message: str, field: str, base: int) -> FormatError:
    return cls(message, structure="vmdk cowd header", field=field, offset=base + _AT[field])


def parse_cowd_header(
    data: bytes | bytearray | memoryview, file_size: int, *, offset: int = 0
) -> CowdHeader:
    """Parse and check a COWD header (the first 44 bytes of ``data``).

    QEMU's checks (granularity at most :data:`COWD_GRANULARITY_MAX`, directory at most
    :data:`VMDK_L1_SIZE_MAX` entries) and more: a granularity of 0 (QEMU divides by it)
    and a grain directory past the end of the file (``file_size``; QEMU reads zeros
    there) are refused.  Raises :class:`TruncatedImage`, :class:`FormatError` (bad magic)
    or :class:`CorruptImage`.
    """
    raw = _parse(COWD_HEADER, data, "vmdk cowd header", offset)
    if raw.magic != VMDK3_MAGIC:
        raise FormatError(
            "not a COWD sparse extent (bad magic)",
            structure="vmdk cowd header",
            field="magic",
            offset=offset,
        )
    h = CowdHeader(
        raw.version,
        raw.flags,
        raw.disk_sectors,
        raw.granularity,
        raw.l1dir_offset,
        raw.l1dir_size,
        raw.file_sectors,
        raw.cylinders,
        raw.heads,
        raw.sectors_per_track,
    )
    if h.granularity == 0 or h.granularity > COWD_GRANULARITY_MAX:
        raise _bad(
            CorruptImage,
            f"Invalid granularity {h.granularity}, image may be corrupt",
            "granularity",
            offset,
        )
    if h.l1dir_size > VMDK_L1_SIZE_MAX:
        raise _bad(CorruptImage, f"L1 size too big ({h.l1dir_size})", "l1dir_size", offset)
    start, length = h.gd_range
    if h.l1dir_size and start + length > file_size:
        raise _bad(
            TruncatedImage,
            f"grain directory ({h.l1dir_size} entries at {start:#x}) extends past the end "
            f"of the file ({file_size} bytes)",
            "l1dir_offset",
            offset,
        )
    return h


def build_cowd_header(h: CowdHeader, size: int = 4 * SECTOR) -> bytes:
    """``h`` as header bytes, zero-padded to ``size`` (ESX's header takes 2 KiB).

    Raises :class:`CorruptImage` when a value does not fit its field.
    """
    try:
        raw: bytes = COWD_HEADER.build(
            {
                "magic": VMDK3_MAGIC,
                "version": h.version,
                "flags": h.flags,
                "disk_sectors": h.disk_sectors,
                "granularity": h.granularity,
                "l1dir_offset": h.l1dir_offset,
                "l1dir_size": h.l1dir_size,
                "file_sectors": h.file_sectors,
                "cylinders": h.cylinders,
                "heads": h.heads,
                "sectors_per_track": h.sectors_per_track,
            }
        )
    except cs.ConstructError as exc:
        raise CorruptImage(
            f"cannot build COWD header: {exc}", structure="vmdk cowd header"
        ) from None
    return raw.ljust(size, b"\0")
