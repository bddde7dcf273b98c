"""VHD ("vpc") structures: hard disk footer, dynamic disk header, BAT, sector bitmaps.

Pure: bytes in, values out (and back).  Layouts and field names follow Microsoft's
"Virtual Hard Disk Image Format Specification" as QEMU's ``block/vpc.c`` spells them;
the rules for the virtual size, the geometry and what is refused follow ``vpc_open``
and ``vpc_co_create`` of QEMU 7.2, so that qcowlib and ``qemu-img`` agree.

File layouts:

* fixed: the disk data from offset 0, then the 512-byte footer;
* dynamic: a copy of the footer at 0, the dynamic disk header (at the footer's
  ``data_offset``), the block allocation table (BAT, at ``table_offset``: one big-endian
  ``uint32`` sector number per block, ``0xFFFFFFFF`` for none), data blocks each
  preceded by a sector bitmap (bit set: the sector holds data; most significant bit
  first), and the footer at the end of the file;
* differencing (disk type 4): a dynamic layout over a parent image named by parent
  locators; a clear sector bitmap bit (or an unallocated block) reads the parent.

The codec is split along the format's structures; this module gathers its public
names, so callers import one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.formats.vhd.bat import (
    bitmap_runs,
    check_bat,
    decode_bat,
    encode_bat,
)
from qcowlib.formats.vhd.dynamic import (
    DynamicHeader,
    bitmap_size,
    build_dynamic_header,
    check_dynamic,
    dynamic_header_offset,
    dynamic_problems,
    locator_path,
    parent_locators,
    parent_name_path,
    parse_dynamic_header,
)
from qcowlib.formats.vhd.footer import (
    BAT_UNALLOCATED,
    CURRENT_SIZE_CREATORS,
    DEFAULT_BLOCK_SIZE,
    DYNAMIC_HEADER,
    DYNAMIC_HEADER_SIZE,
    FOOTER,
    FOOTER_SIZE,
    NO_DATA_OFFSET,
    PARENT_LOCATOR,
    SECTOR,
    VHD_COOKIE,
    VHD_DYNAMIC_COOKIE,
    VHD_MAX_GEOMETRY,
    VHD_MAX_SECTORS,
    VHD_MAX_TABLE_ENTRIES,
    VHD_TIMESTAMP_BASE,
    VHD_TYPE_DIFFERENCING,
    VHD_TYPE_DYNAMIC,
    VHD_TYPE_FIXED,
    VHD_TYPE_NAMES,
    Footer,
    build_footer,
    calculate_geometry,
    checksum,
    create_geometry,
    dynamic_header_checksum,
    footer_checksum,
    footer_problems,
    locate_footer,
    parse_footer,
    virtual_size,
)

if TYPE_CHECKING:
    from qcowlib.formats.vhd.bat import BatArray

__all__ = [
    "BAT_UNALLOCATED",
    "CURRENT_SIZE_CREATORS",
    "DEFAULT_BLOCK_SIZE",
    "DYNAMIC_HEADER",
    "DYNAMIC_HEADER_SIZE",
    "FOOTER",
    "FOOTER_SIZE",
    "NO_DATA_OFFSET",
    "PARENT_LOCATOR",
    "SECTOR",
    "VHD_COOKIE",
    "VHD_DYNAMIC_COOKIE",
    "VHD_MAX_GEOMETRY",
    "VHD_MAX_SECTORS",
    "VHD_MAX_TABLE_ENTRIES",
    "VHD_TIMESTAMP_BASE",
    "VHD_TYPE_DIFFERENCING",
    "VHD_TYPE_DYNAMIC",
    "VHD_TYPE_FIXED",
    "VHD_TYPE_NAMES",
    "BatArray",
    "DynamicHeader",
    "Footer",
    "bitmap_runs",
    "bitmap_size",
    "build_dynamic_header",
    "build_footer",
    "calculate_geometry",
    "check_bat",
    "check_dynamic",
    "checksum",
    "create_geometry",
    "decode_bat",
    "dynamic_header_checksum",
    "dynamic_header_offset",
    "dynamic_problems",
    "encode_bat",
    "footer_checksum",
    "footer_problems",
    "locate_footer",
    "locator_path",
    "parent_locators",
    "parent_name_path",
    "parse_dynamic_header",
    "parse_footer",
    "virtual_size",
]
