"""VHDX constants, checksums and on-disk layouts (MS-VHDX 2.2-2.6), shared by the codec's parts."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import construct as cs

from qcowlib.errors import (
    FormatError,
)

if TYPE_CHECKING:
    # numpy is imported where the BAT is decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    BatArray = npt.NDArray[np.uint64]


MIB: Final = 1 << 20
VHDX_SIGNATURE: Final = b"vhdxfile"
VHDX_HEADER_OFFSETS: Final = (64 * 1024, 128 * 1024)
VHDX_HEADER_SIZE: Final = 4096
VHDX_REGION_TABLE_OFFSETS: Final = (192 * 1024, 256 * 1024)
VHDX_REGION_TABLE_SIZE: Final = 64 * 1024
#: The first 320 KiB hold the identifier, both headers and both region tables.
VHDX_HEADER_AREA: Final = 320 * 1024
#: Regions, the log and payload blocks all lie past the 1 MiB header section.
VHDX_HEADER_SECTION_END: Final = MIB
VHDX_METADATA_TABLE_SIZE: Final = 64 * 1024
#: Region table and metadata table entry limit (spec 2.2.3, 2.6.1).
VHDX_MAX_ENTRIES: Final = 2047
#: The largest virtual disk the specification allows (64 TiB).
VHDX_MAX_SIZE: Final = 64 * (1 << 40)
#: A parent locator item larger than this is not read.
VHDX_MAX_LOCATOR: Final = 64 * 1024
#: Block size limits (spec 2.6.2.1: a power of two from 1 MiB to 256 MiB).
VHDX_BLOCK_SIZE_MIN: Final = MIB
VHDX_BLOCK_SIZE_MAX: Final = 256 * MIB
#: Sectors one sector bitmap block describes (1 MiB of bits); defines the chunk ratio.
VHDX_MAX_SECTORS_PER_BLOCK: Final = 1 << 23

PAYLOAD_BLOCK_NOT_PRESENT: Final = 0
PAYLOAD_BLOCK_UNDEFINED: Final = 1
PAYLOAD_BLOCK_ZERO: Final = 2
PAYLOAD_BLOCK_UNMAPPED: Final = 3
PAYLOAD_BLOCK_FULLY_PRESENT: Final = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT: Final = 7
SB_BLOCK_NOT_PRESENT: Final = 0
SB_BLOCK_PRESENT: Final = 6
BAT_STATE_MASK: Final = 0x7
_BAT_OFFSET_SHIFT: Final = 20
_PAYLOAD_STATES: Final = (0, 1, 2, 3, 6, 7)


def guid(text: str) -> bytes:
    """The on-disk bytes of a GUID written ``XXXXXXXX-XXXX-...`` (mixed-endian)."""
    return uuid.UUID(text).bytes_le


def guid_text(raw: bytes) -> str:
    """The upper-case text form of on-disk GUID bytes."""
    return str(uuid.UUID(bytes_le=bytes(raw))).upper()


VHDX_BAT_GUID: Final = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
VHDX_METADATA_GUID: Final = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
VHDX_FILE_PARAMETERS: Final = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VHDX_VIRTUAL_DISK_SIZE: Final = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VHDX_PAGE83: Final = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
VHDX_LOGICAL_SECTOR_SIZE: Final = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
VHDX_PHYSICAL_SECTOR_SIZE: Final = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
VHDX_PARENT_LOCATOR: Final = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_KNOWN_METADATA: Final = (
    VHDX_FILE_PARAMETERS,
    VHDX_VIRTUAL_DISK_SIZE,
    VHDX_PAGE83,
    VHDX_LOGICAL_SECTOR_SIZE,
    VHDX_PHYSICAL_SECTOR_SIZE,
    VHDX_PARENT_LOCATOR,
)
VHDX_PARAMS_LEAVE_BLOCKS_ALLOCATED: Final = 1 << 0
VHDX_PARAMS_HAS_PARENT: Final = 1 << 1
VHDX_META_FLAGS_IS_USER: Final = 1 << 0
VHDX_META_FLAGS_IS_VIRTUAL_DISK: Final = 1 << 1
VHDX_META_FLAGS_IS_REQUIRED: Final = 1 << 2

FILE_IDENTIFIER = cs.Struct(
    "signature" / cs.Bytes(8),
    "creator" / cs.Bytes(512),
)
HEADER = cs.Struct(
    "signature" / cs.Bytes(4),
    "checksum" / cs.Int32ul,
    "sequence_number" / cs.Int64ul,
    "file_write_guid" / cs.Bytes(16),
    "data_write_guid" / cs.Bytes(16),
    "log_guid" / cs.Bytes(16),
    "log_version" / cs.Int16ul,
    "version" / cs.Int16ul,
    "log_length" / cs.Int32ul,
    "log_offset" / cs.Int64ul,
)
REGION_TABLE_HEADER = cs.Struct(
    "signature" / cs.Bytes(4),
    "checksum" / cs.Int32ul,
    "entry_count" / cs.Int32ul,
    "reserved" / cs.Int32ul,
)
REGION_ENTRY = cs.Struct(
    "guid" / cs.Bytes(16),
    "file_offset" / cs.Int64ul,
    "length" / cs.Int32ul,
    "data_bits" / cs.Int32ul,
)
METADATA_HEADER = cs.Struct(
    "signature" / cs.Bytes(8),
    "reserved" / cs.Int16ul,
    "entry_count" / cs.Int16ul,
)
METADATA_ENTRY = cs.Struct(
    "item_id" / cs.Bytes(16),
    "offset" / cs.Int32ul,
    "length" / cs.Int32ul,
    "data_bits" / cs.Int32ul,
)
LOCATOR_HEADER = cs.Struct(
    "locator_type" / cs.Bytes(16),
    "reserved" / cs.Int16ul,
    "key_value_count" / cs.Int16ul,
)
LOCATOR_ENTRY = cs.Struct(
    "key_offset" / cs.Int32ul,
    "value_offset" / cs.Int32ul,
    "key_length" / cs.Int16ul,
    "value_length" / cs.Int16ul,
)
_HEADER_SIGNATURE: Final = b"head"
_REGION_SIGNATURE: Final = b"regi"
_METADATA_SIGNATURE: Final = b"metadata"
_CHECKSUM_AT: Final = 4
_REGION_ENTRY_SIZE: Final = 32
_METADATA_ENTRY_SIZE: Final = 32

_U64LE: Final = "<u8"


# ---------------------------------------------------------------------------------------
# CRC-32C


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli), as [MS-VHDX] checksums use.  Pure Python (~15 MB/s): callers
    cap ``data`` (headers and region tables 64 KiB; log entries by the log's length and
    checksum budget, formats/vhdx/log.py)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _checksum(block: bytes) -> int:
    """The CRC-32C of a header or table with its checksum field (at 4) taken as zero."""
    return crc32c(block[:_CHECKSUM_AT] + bytes(4) + block[_CHECKSUM_AT + 4 :])


def _with_checksum(block: bytes) -> bytes:
    out = bytearray(block)
    out[_CHECKSUM_AT : _CHECKSUM_AT + 4] = _checksum(block).to_bytes(4, "little")
    return bytes(out)


def _build(layout: Any, values: Mapping[str, Any], what: str) -> bytes:
    try:
        return bytes(layout.build(dict(values)))
    except (cs.ConstructError, ValueError, TypeError) as exc:
        raise FormatError(f"cannot build {what}: {exc}", structure=what) from None
