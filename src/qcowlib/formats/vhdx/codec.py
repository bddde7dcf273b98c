"""VHDX structures: file type identifier, headers, region table, metadata, BAT.

Pure: bytes in, values out (and back).  Layouts and field names follow Microsoft's
[MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format" as QEMU's ``block/vhdx.h`` spells
them; what is refused follows QEMU 7.2's ``vhdx_open`` (``block/vhdx.c``).

File layout (all little-endian, GUIDs in Microsoft's mixed-endian byte order):

* 0: file type identifier (``vhdxfile`` and a UTF-16LE creator), 64 KiB;
* 64 KiB and 128 KiB: two 4 KiB headers, each with a CRC-32C and a sequence number;
  the valid one with the higher sequence number is current (spec 2.2.2);
* 192 KiB and 256 KiB: two identical 64 KiB region tables naming, by GUID, the BAT
  region and the metadata region (both 1 MiB aligned);
* the log (named by the current header), the BAT, the metadata region (a 64 KiB table
  of items, then the items) and the payload blocks, anywhere past 1 MiB.

The BAT is one ``uint64`` per entry: bits 0-2 the state, bits 20-63 the file offset in
MiB.  Payload block ``i`` has entry ``i + i // chunk_ratio``: after every
``chunk_ratio`` payload entries comes one sector bitmap entry (used only by
differencing disks), spec 2.5.

The codec is split along the format's structures; this module gathers its public
names, so callers import one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.formats.vhdx.bat import (
    bat_entries,
    bat_offsets,
    bat_size,
    bat_states,
    check_bat,
    check_differencing_bat,
    chunk_ratio,
    decode_bat,
    encode_bat,
    payload_bat_index,
)
from qcowlib.formats.vhdx.header import (
    Header,
    RegionEntry,
    build_file_identifier,
    build_header,
    build_region_table,
    check_regions,
    current_header,
    parse_file_identifier,
    parse_header,
    parse_region_table,
    region_problems,
    updated_header,
)
from qcowlib.formats.vhdx.metadata import (
    Metadata,
    MetadataEntry,
    build_metadata_items,
    build_metadata_table,
    decode_metadata,
    metadata_problems,
    parse_metadata_table,
    parse_parent_locator,
)
from qcowlib.formats.vhdx.spec import (
    BAT_STATE_MASK,
    FILE_IDENTIFIER,
    HEADER,
    LOCATOR_ENTRY,
    LOCATOR_HEADER,
    METADATA_ENTRY,
    METADATA_HEADER,
    MIB,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    PAYLOAD_BLOCK_UNDEFINED,
    PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_ZERO,
    REGION_ENTRY,
    REGION_TABLE_HEADER,
    SB_BLOCK_NOT_PRESENT,
    SB_BLOCK_PRESENT,
    VHDX_BAT_GUID,
    VHDX_BLOCK_SIZE_MAX,
    VHDX_BLOCK_SIZE_MIN,
    VHDX_FILE_PARAMETERS,
    VHDX_HEADER_AREA,
    VHDX_HEADER_OFFSETS,
    VHDX_HEADER_SECTION_END,
    VHDX_HEADER_SIZE,
    VHDX_KNOWN_METADATA,
    VHDX_LOGICAL_SECTOR_SIZE,
    VHDX_MAX_ENTRIES,
    VHDX_MAX_LOCATOR,
    VHDX_MAX_SECTORS_PER_BLOCK,
    VHDX_MAX_SIZE,
    VHDX_METADATA_GUID,
    VHDX_METADATA_TABLE_SIZE,
    VHDX_PAGE83,
    VHDX_PARAMS_HAS_PARENT,
    VHDX_PARAMS_LEAVE_BLOCKS_ALLOCATED,
    VHDX_PARENT_LOCATOR,
    VHDX_PHYSICAL_SECTOR_SIZE,
    VHDX_REGION_TABLE_OFFSETS,
    VHDX_REGION_TABLE_SIZE,
    VHDX_SIGNATURE,
    VHDX_VIRTUAL_DISK_SIZE,
    crc32c,
    guid,
    guid_text,
)

if TYPE_CHECKING:
    from qcowlib.formats.vhdx.bat import BatArray

__all__ = [
    "BAT_STATE_MASK",
    "FILE_IDENTIFIER",
    "HEADER",
    "LOCATOR_ENTRY",
    "LOCATOR_HEADER",
    "METADATA_ENTRY",
    "METADATA_HEADER",
    "MIB",
    "PAYLOAD_BLOCK_FULLY_PRESENT",
    "PAYLOAD_BLOCK_NOT_PRESENT",
    "PAYLOAD_BLOCK_PARTIALLY_PRESENT",
    "PAYLOAD_BLOCK_UNDEFINED",
    "PAYLOAD_BLOCK_UNMAPPED",
    "PAYLOAD_BLOCK_ZERO",
    "REGION_ENTRY",
    "REGION_TABLE_HEADER",
    "SB_BLOCK_NOT_PRESENT",
    "SB_BLOCK_PRESENT",
    "VHDX_BAT_GUID",
    "VHDX_BLOCK_SIZE_MAX",
    "VHDX_BLOCK_SIZE_MIN",
    "VHDX_FILE_PARAMETERS",
    "VHDX_HEADER_AREA",
    "VHDX_HEADER_OFFSETS",
    "VHDX_HEADER_SECTION_END",
    "VHDX_HEADER_SIZE",
    "VHDX_KNOWN_METADATA",
    "VHDX_LOGICAL_SECTOR_SIZE",
    "VHDX_MAX_ENTRIES",
    "VHDX_MAX_LOCATOR",
    "VHDX_MAX_SECTORS_PER_BLOCK",
    "VHDX_MAX_SIZE",
    "VHDX_METADATA_GUID",
    "VHDX_METADATA_TABLE_SIZE",
    "VHDX_PAGE83",
    "VHDX_PARAMS_HAS_PARENT",
    "VHDX_PARAMS_LEAVE_BLOCKS_ALLOCATED",
    "VHDX_PARENT_LOCATOR",
    "VHDX_PHYSICAL_SECTOR_SIZE",
    "VHDX_REGION_TABLE_OFFSETS",
    "VHDX_REGION_TABLE_SIZE",
    "VHDX_SIGNATURE",
    "VHDX_VIRTUAL_DISK_SIZE",
    "BatArray",
    "Header",
    "Metadata",
    "MetadataEntry",
    "RegionEntry",
    "bat_entries",
    "bat_offsets",
    "bat_size",
    "bat_states",
    "build_file_identifier",
    "build_header",
    "build_metadata_items",
    "build_metadata_table",
    "build_region_table",
    "check_bat",
    "check_differencing_bat",
    "check_regions",
    "chunk_ratio",
    "crc32c",
    "current_header",
    "decode_bat",
    "decode_metadata",
    "encode_bat",
    "guid",
    "guid_text",
    "metadata_problems",
    "parse_file_identifier",
    "parse_header",
    "parse_metadata_table",
    "parse_parent_locator",
    "parse_region_table",
    "payload_bat_index",
    "region_problems",
    "updated_header",
]
