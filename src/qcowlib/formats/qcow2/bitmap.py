"""Persistent dirty bitmaps: the bitmap directory (qcow2.txt "Bitmaps")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import construct as cs

from qcowlib.errors import CorruptImage, TruncatedImage
from qcowlib.formats._layout import parse_fixed

_DIR = "bitmap directory"

#: QEMU's caps: QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
MAX_BITMAPS: Final = 65535
MAX_BITMAP_DIRECTORY_SIZE: Final = 1024 * MAX_BITMAPS
MAX_BITMAP_NAME: Final = 1023

BME_FLAG_IN_USE: Final = 1 << 0
BME_FLAG_AUTO: Final = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE: Final = 1 << 2
#: The fixed part of a bitmap directory entry; extra data and the name follow, then
#: padding to 8 bytes.
BITMAP_DIR_ENTRY = cs.Struct(
    "bitmap_table_offset" / cs.Int64ub,
    "bitmap_table_size" / cs.Int32ub,
    "flags" / cs.Int32ub,
    "type" / cs.Int8ub,
    "granularity_bits" / cs.Int8ub,
    "name_size" / cs.Int16ub,
    "extra_data_size" / cs.Int32ub,
)
BITMAP_DIR_ENTRY_SIZE: Final = BITMAP_DIR_ENTRY.sizeof()


@dataclass(frozen=True)
class BitmapEntry:
    """One bitmap directory entry."""

    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def shown_name(self) -> str:
        """The name as qemu-img shows it: bytes that are not UTF-8 as U+FFFD."""
        return self.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    @property
    def flag_names(self) -> list[str]:
        """As ``qemu-img info`` lists them."""
        names = []
        if self.flags & BME_FLAG_IN_USE:
            names.append("in-use")
        if self.flags & BME_FLAG_AUTO:
            names.append("auto")
        return names


def parse_bitmap_directory(data: bytes | memoryview, nb_bitmaps: int) -> list[BitmapEntry]:
    """Parse the bitmap directory; raises :class:`TruncatedImage` or :class:`CorruptImage`."""
    if nb_bitmaps > MAX_BITMAPS:
        raise CorruptImage("too many bitmaps", structure="bitmaps extension", field="nb_bitmaps")
    mv = memoryview(data)
    out: list[BitmapEntry] = []
    pos = 0
    for i in range(nb_bitmaps):
        if pos + BITMAP_DIR_ENTRY_SIZE > len(mv):
            raise TruncatedImage(f"bitmap directory entry {i} is truncated", structure=_DIR)
        e = parse_fixed(BITMAP_DIR_ENTRY, mv[pos:], _DIR, pos)
        name_size, extra, gbits = e.name_size, e.extra_data_size, e.granularity_bits
        pos += BITMAP_DIR_ENTRY_SIZE
        if name_size > MAX_BITMAP_NAME or name_size == 0:
            raise CorruptImage(f"bitmap {i} has an invalid name size", structure=_DIR)
        end = pos + extra + name_size
        if end > len(mv):
            raise TruncatedImage(f"bitmap directory entry {i} is truncated", structure=_DIR)
        # Bytes that are not UTF-8 are kept as surrogates: written back unchanged,
        # shown as U+FFFD (shown_name), as qemu-img shows them.
        name = bytes(mv[pos + extra : end]).decode("utf-8", "surrogateescape")
        pos = (end + 7) & ~7
        if not 9 <= gbits <= 31:
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise CorruptImage(f"bitmap {shown!r} has granularity bits {gbits}", structure=_DIR)
        out.append(
            BitmapEntry(e.bitmap_table_offset, e.bitmap_table_size, e.flags, e.type, gbits, name)
        )
    return out


# Directory entry constraints QEMU checks (block/qcow2-bitmap.c).
BME_MAX_TABLE_SIZE: Final = 0x800_0000
BME_MAX_PHYS_SIZE: Final = 0x2000_0000
BME_MAX_GRANULARITY_BITS: Final = 31
BME_MIN_GRANULARITY_BITS: Final = 9
BME_RESERVED_FLAGS: Final = 0xFFFF_FFFC
BME_TABLE_ENTRY_RESERVED_MASK: Final = 0xFF00_0000_0000_01FE
BME_TABLE_ENTRY_OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
BME_TABLE_ENTRY_FLAG_ALL_ONES: Final = 1
BT_DIRTY_TRACKING_BITMAP: Final = 1


def bitmap_tables(
    data: bytes, nb_bitmaps: int, cluster_size: int, virtual_size: int
) -> list[tuple[int, int]] | None:
    """The ``(bitmap_table_offset, bitmap_table_size)`` of each entry of a directory, or
    None when QEMU's ``bitmap_list_load`` and ``check_dir_entry`` would refuse it."""
    size = len(data)
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        if pos + BITMAP_DIR_ENTRY_SIZE > size or len(out) + 1 > nb_bitmaps:
            return None
        e = BITMAP_DIR_ENTRY.parse(data[pos : pos + BITMAP_DIR_ENTRY_SIZE])
        t_off, t_size, gbits = e.bitmap_table_offset, e.bitmap_table_size, e.granularity_bits
        entry_size = (BITMAP_DIR_ENTRY_SIZE + e.name_size + e.extra_data_size + 7) & ~7
        if pos + entry_size > size or e.extra_data_size != 0:
            return None
        if (
            t_size == 0
            or t_off == 0
            or t_off % cluster_size
            or t_size > BME_MAX_TABLE_SIZE
            or gbits > BME_MAX_GRANULARITY_BITS
            or gbits < BME_MIN_GRANULARITY_BITS
            or e.flags & BME_RESERVED_FLAGS
            or e.name_size > MAX_BITMAP_NAME
            or e.type != BT_DIRTY_TRACKING_BITMAP
        ):
            return None
        phys = t_size * cluster_size
        if phys > BME_MAX_PHYS_SIZE or virtual_size > (phys * 8) << gbits:
            return None
        out.append((t_off, t_size))
        pos += entry_size
    if len(out) != nb_bitmaps:
        return None
    return out
