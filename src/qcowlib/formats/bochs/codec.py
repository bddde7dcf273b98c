"""Bochs "growing" redolog images: header, catalog and extent bitmaps.

Pure: :func:`parse_header` turns the first 512 bytes of a file into a
:class:`BochsHeader`, :func:`decode_catalog` the catalog into extent positions,
:func:`sector_bits` an extent's bitmap into one flag per sector.  Nothing here opens a
file.

Layout (Bochs ``iodev/hdimage/hdimage.h`` ``redolog_header_t``; QEMU ``block/bochs.c``,
whose names are used here), all little-endian::

    0x000  magic[32]    "Bochs Virtual HD Image", NUL-terminated
    0x020  type[16]     "Redolog"
    0x030  subtype[16]  "Growing" (the only subtype QEMU opens; "Undoable" and
                        "Volatile" redologs need a base image)
    0x040  version      0x00020000 (v2) or 0x00010000 (v1)
    0x044  header       size of the header = file offset of the catalog
    0x048  catalog      number of catalog entries (u32 each)
    0x04c  bitmap       bytes of the sector bitmap in front of each extent
    0x050  extent       bytes of guest data per extent
    0x054  v2: reserved (u32), disk (u64) | v1: disk (u64)

The catalog maps extent ``i`` (guest bytes ``[i * extent, (i + 1) * extent)``) to an
index ``n`` in the data area (0xffffffff: not allocated, reads as zeros).  Extent ``n``
is stored at ``data_offset + n * 512 * (bitmap_blocks + extent_blocks)``: first its
bitmap (bit ``k`` of byte ``k // 8``, least significant first, set when sector ``k`` was
written), then its sectors.  A clear bit reads as zeros.

Caps are QEMU's (``bochs_open``): at most 0x100000 catalog entries, extents of 512 bytes
to 8 MiB in powers of two, and a catalog that covers the disk size.  qcowlib also
refuses what QEMU reads without looking: a catalog or a used extent bitmap past the end
of the file, a bitmap too small for its extent's sectors (QEMU would read data bytes as
bitmap), and a data area starting past 4 GiB (QEMU's offset is a 32-bit sum).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib.errors import CorruptImage, FormatError, TruncatedImage, UnsupportedFeature
from qcowlib.formats._record import FixedLayout

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]
    Bits = npt.NDArray[np.bool_]

__all__ = [
    "BOCHS_CATALOG_MAX",
    "BOCHS_EXTENT_MAX",
    "GROWING_TYPE",
    "HEADER_MAGIC",
    "HEADER_SIZE",
    "HEADER_V1",
    "HEADER_VERSION",
    "REDOLOG_TYPE",
    "SECTOR",
    "UNALLOCATED",
    "BochsHeader",
    "decode_catalog",
    "is_bochs",
    "parse_header",
    "sector_bits",
]

HEADER_MAGIC: Final = b"Bochs Virtual HD Image"
REDOLOG_TYPE: Final = b"Redolog"
GROWING_TYPE: Final = b"Growing"
HEADER_VERSION: Final = 0x00020000
HEADER_V1: Final = 0x00010000
HEADER_SIZE: Final = 512
SECTOR: Final = 512
#: A catalog entry for an extent with no data.
UNALLOCATED: Final = 0xFFFFFFFF
#: QEMU: "Limit to 1M entries to avoid unbounded allocation" (bximage's largest, ~8 TB).
BOCHS_CATALOG_MAX: Final = 0x100000
#: QEMU's largest extent size.
BOCHS_EXTENT_MAX: Final = 0x800000
#: Largest bitmap field accepted (qcowlib's cap; an 8 MiB extent needs 2 KiB).
BOCHS_BITMAP_MAX: Final = 0x800000

_COMMON: Final = [
    ("magic", "32s"),
    ("type", "16s"),
    ("subtype", "16s"),
    ("version", "I"),
    ("header", "I"),
    ("catalog", "I"),
    ("bitmap", "I"),
    ("extent", "I"),
]
#: Version 2 header (``struct bochs_header`` with ``extra.redolog``).
HEADER_V2_LAYOUT: Final = FixedLayout(
    "bochs header", "<", [*_COMMON, ("reserved", "I"), ("disk", "Q")]
)
#: Version 1 header (``extra.redolog_v1``: no reserved word before the disk size).
HEADER_V1_LAYOUT: Final = FixedLayout("bochs header", "<", [*_COMMON, ("disk", "Q")])


class BochsHeader(NamedTuple):
    """The header fields QEMU uses, and what follows from them."""

    version: int
    header: int
    catalog: int
    bitmap: int
    extent: int
    disk: int

    @property
    def virtual_size(self) -> int:
        """Whole sectors of ``disk`` (QEMU's ``total_sectors``), in bytes."""
        return self.disk // SECTOR * SECTOR

    @property
    def data_offset(self) -> int:
        """Where the first extent's bitmap is: just after the catalog."""
        return self.header + self.catalog * 4

    @property
    def bitmap_blocks(self) -> int:
        return -(-self.bitmap // SECTOR)

    @property
    def extent_blocks(self) -> int:
        return self.extent // SECTOR

    @property
    def stride(self) -> int:
        """Bytes each allocated extent takes in the data area (bitmap and sectors)."""
        return SECTOR * (self.bitmap_blocks + self.extent_blocks)

    @property
    def bitmap_used(self) -> int:
        """Bitmap bytes that hold a bit for some sector of an extent."""
        return -(-self.extent_blocks // 8)

    @property
    def extents_used(self) -> int:
        """Catalog entries that cover the disk."""
        return -(-self.virtual_size // self.extent)


def _cstring_is(field: bytes, value: bytes) -> bool:
    """C ``strcmp(field, value) == 0`` for a fixed field longer than ``value``."""
    return field[: len(value) + 1] == value + b"\0"


def is_bochs(head: bytes | bytearray | memoryview) -> bool:
    """QEMU's ``bochs_probe``: magic, type "Redolog", subtype "Growing", version 1 or 2."""
    if len(head) < HEADER_V1_LAYOUT.sizeof():
        return False
    rec = HEADER_V1_LAYOUT.parse(head)
    return (
        _cstring_is(rec.magic, HEADER_MAGIC)
        and _cstring_is(rec.type, REDOLOG_TYPE)
        and _cstring_is(rec.subtype, GROWING_TYPE)
        and rec.version in (HEADER_VERSION, HEADER_V1)
    )


def parse_header(data: bytes | bytearray | memoryview, file_size: int) -> BochsHeader:
    """The header at the start of ``data`` (the file's first 512 bytes), checked.

    Raises :class:`TruncatedImage` for a short header or a catalog past the end of the
    file, :class:`FormatError` when the magic, type, subtype or version is not a
    growing Bochs image (:class:`UnsupportedFeature` for other redolog subtypes) and
    :class:`CorruptImage` for a field outside QEMU's limits.
    """
    if len(data) < HEADER_SIZE or file_size < HEADER_SIZE:
        raise TruncatedImage("bochs header is truncated", structure="bochs header", offset=0)
    rec = HEADER_V2_LAYOUT.parse(data)
    if not (_cstring_is(rec.magic, HEADER_MAGIC) and _cstring_is(rec.type, REDOLOG_TYPE)):
        raise FormatError("Image not in Bochs format", structure="bochs header", field="magic")
    if not _cstring_is(rec.subtype, GROWING_TYPE):
        subtype = bytes(rec.subtype).split(b"\0", 1)[0].decode("ascii", "replace")
        raise UnsupportedFeature(
            f"Bochs redolog subtype {subtype!r} is not supported (only 'Growing')",
            structure="bochs header",
            field="subtype",
        )
    if rec.version not in (HEADER_VERSION, HEADER_V1):
        raise FormatError(
            f"Bochs header version {rec.version:#x} is not supported",
            structure="bochs header",
            field="version",
        )
    disk = rec.disk if rec.version == HEADER_VERSION else HEADER_V1_LAYOUT.parse(data).disk
    header = BochsHeader(rec.version, rec.header, rec.catalog, rec.bitmap, rec.extent, disk)
    _check_header(header, file_size)
    return header


def _bad(message: str, name: str) -> CorruptImage:
    return CorruptImage(message, structure="bochs header", field=name)


def _check_header(h: BochsHeader, file_size: int) -> None:
    if h.catalog > BOCHS_CATALOG_MAX:
        raise _bad(f"Catalog size {h.catalog} is too large (max {BOCHS_CATALOG_MAX})", "catalog")
    if h.extent < SECTOR:
        raise _bad("Extent size must be at least 512", "extent")
    if h.extent & (h.extent - 1):
        raise _bad(f"Extent size {h.extent} is not a power of two", "extent")
    if h.extent > BOCHS_EXTENT_MAX:
        raise _bad(f"Extent size {h.extent} is too large", "extent")
    if h.catalog < h.extents_used:
        raise _bad("Catalog size is too small for this disk size", "catalog")
    if not h.bitmap_used <= h.bitmap <= BOCHS_BITMAP_MAX:
        raise _bad(
            f"bitmap size {h.bitmap} does not fit extents of {h.extent} bytes "
            f"({h.bitmap_used} to {BOCHS_BITMAP_MAX})",
            "bitmap",
        )
    if h.header < HEADER_SIZE:
        raise _bad(f"header size {h.header} is smaller than the header", "header")
    if h.data_offset > 0xFFFFFFFF:
        raise _bad("the catalog ends past 4 GiB (QEMU's 32-bit data offset)", "header")
    if h.data_offset > file_size:
        raise TruncatedImage(
            f"bochs catalog ({h.catalog} entries) is past the end of the file",
            structure="bochs catalog",
            offset=h.header,
        )


def decode_catalog(raw: bytes, header: BochsHeader, file_size: int) -> I64:
    """File offsets of the bitmaps of the extents that cover the disk (-1: none).

    ``raw`` is the catalog (``header.catalog * 4`` bytes at ``header.header``).  Raises
    :class:`CorruptImage` naming the first entry whose bitmap lies past the end of the
    file.
    """
    import numpy as np

    used = header.extents_used
    if len(raw) < used * 4:
        raise TruncatedImage("bochs catalog is truncated", structure="bochs catalog")
    entries = np.frombuffer(raw, dtype="<u4", count=used).astype(np.int64)
    allocated = entries != UNALLOCATED
    bases = np.where(allocated, header.data_offset + entries * header.stride, -1)
    past = np.flatnonzero(allocated & (bases + header.bitmap_used > file_size))
    if past.size:
        i = int(past[0])
        raise CorruptImage(
            f"extent {i} (catalog entry {int(entries[i])}) has its bitmap at "
            f"{int(bases[i]):#x}, past the end of the file",
            structure="bochs catalog",
            offset=header.header + 4 * i,
        )
    return bases.astype(np.int64)


def sector_bits(bitmap: bytes, sectors: int) -> Bits:
    """One flag per sector of an extent from its bitmap (set: written, else zeros)."""
    import numpy as np

    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return bits[:sectors].astype(np.bool_)
