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
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import construct as cs

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    QcowlibError,
    TruncatedImage,
    UnsupportedFeature,
)
from qcowlib.formats._layout import parse_fixed as _parse

if TYPE_CHECKING:
    # numpy is imported where the BAT is decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    BatArray = npt.NDArray[np.uint64]

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
]

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
    """CRC-32C (Castagnoli), as [MS-VHDX] checksums use.  Callers cap ``data`` (64 KiB)."""
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


# ---------------------------------------------------------------------------------------
# file type identifier (spec 2.2.1)


def parse_file_identifier(data: bytes) -> str:
    """The creator string of the file type identifier at offset 0.

    Raises :class:`TruncatedImage` for short data and :class:`FormatError` without the
    ``vhdxfile`` signature.
    """
    if len(data) >= 8 and data[:8] != VHDX_SIGNATURE:
        raise FormatError(
            "VHDX file identifier 'vhdxfile' is missing",
            structure="vhdx file identifier",
            field="signature",
            offset=0,
        )
    fi = _parse(FILE_IDENTIFIER, data, "vhdx file identifier", 0)
    return str(fi.creator.decode("utf-16-le", "replace").split("\0", 1)[0])


def build_file_identifier(creator: str) -> bytes:
    """The 64 KiB file type identifier with ``creator`` (at most 256 UTF-16 units)."""
    raw = creator.encode("utf-16-le")[:512]
    return (VHDX_SIGNATURE + raw).ljust(64 * 1024, b"\0")


# ---------------------------------------------------------------------------------------
# headers (spec 2.2.2)


@dataclass(frozen=True)
class Header:
    """One of the two 4 KiB headers (QEMU ``VHDXHeader``)."""

    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int
    checksum: int = 0

    @property
    def log_needs_replay(self) -> bool:
        """A non-zero log GUID: the log holds entries that must be replayed first."""
        return any(self.log_guid)


def parse_header(data: bytes, offset: int = 0) -> Header:
    """Parse a 4 KiB header found at file ``offset``.

    Raises :class:`TruncatedImage` for short data, :class:`FormatError` without the
    ``head`` signature and :class:`CorruptImage` when the CRC-32C is wrong.
    """
    what = "vhdx header"
    if len(data) < VHDX_HEADER_SIZE:
        raise TruncatedImage(
            f"{what} is truncated ({len(data)} of {VHDX_HEADER_SIZE} bytes)",
            structure=what,
            offset=offset,
        )
    block = bytes(data[:VHDX_HEADER_SIZE])
    h = _parse(HEADER, block, what, offset)
    if h.signature != _HEADER_SIGNATURE:
        raise FormatError(
            "VHDX header signature 'head' is missing",
            structure=what,
            field="signature",
            offset=offset,
        )
    if h.checksum != _checksum(block):
        raise CorruptImage(
            "VHDX header checksum is wrong",
            structure=what,
            field="checksum",
            offset=offset + _CHECKSUM_AT,
        )
    return Header(
        sequence_number=h.sequence_number,
        file_write_guid=h.file_write_guid,
        data_write_guid=h.data_write_guid,
        log_guid=h.log_guid,
        log_version=h.log_version,
        version=h.version,
        log_length=h.log_length,
        log_offset=h.log_offset,
        checksum=h.checksum,
    )


def build_header(h: Header) -> bytes:
    """The 4 KiB of ``h`` with a freshly computed CRC-32C (``h.checksum`` ignored).

    Raises :class:`FormatError` when a field does not fit its width.
    """
    raw = _build(
        HEADER,
        {
            "signature": _HEADER_SIGNATURE,
            "checksum": 0,
            "sequence_number": h.sequence_number,
            "file_write_guid": h.file_write_guid,
            "data_write_guid": h.data_write_guid,
            "log_guid": h.log_guid,
            "log_version": h.log_version,
            "version": h.version,
            "log_length": h.log_length,
            "log_offset": h.log_offset,
        },
        "vhdx header",
    )
    return _with_checksum(raw.ljust(VHDX_HEADER_SIZE, b"\0"))


def current_header(area: bytes) -> tuple[Header, int]:
    """The current header of the first 320 KiB and its offset (spec 2.2.2.1).

    The current header is the valid one with the higher sequence number.  Raises
    :class:`TruncatedImage` when the area is too short for either header,
    :class:`CorruptImage` when neither is valid (the error of the first one is chained
    in the message) or both are valid with the same sequence number but differ, and
    :class:`UnsupportedFeature` for a header version other than 1.
    """
    if len(area) < VHDX_HEADER_OFFSETS[0] + VHDX_HEADER_SIZE:
        raise TruncatedImage(
            "VHDX file is too short for its headers",
            structure="vhdx header",
            offset=VHDX_HEADER_OFFSETS[0],
        )
    found: list[tuple[Header, int]] = []
    errors: list[str] = []
    for at in VHDX_HEADER_OFFSETS:
        try:
            found.append((parse_header(area[at : at + VHDX_HEADER_SIZE], at), at))
        except FormatError as exc:
            errors.append(str(exc))
    if not found:
        raise CorruptImage(
            f"no valid VHDX header found ({'; '.join(errors)})",
            structure="vhdx header",
            offset=VHDX_HEADER_OFFSETS[0],
        )
    found.sort(key=lambda f: f[0].sequence_number, reverse=True)
    best, at = found[0]
    if len(found) == 2 and found[1][0].sequence_number == best.sequence_number:
        other = found[1][0]
        if other != best:
            raise CorruptImage(
                "both VHDX headers have the same sequence number but differ",
                structure="vhdx header",
                field="sequence_number",
                offset=VHDX_HEADER_OFFSETS[0] + 8,
            )
        at = VHDX_HEADER_OFFSETS[0]
    if best.version != 1:
        raise UnsupportedFeature(
            f"VHDX header version {best.version} is not 1",
            structure="vhdx header",
            field="version",
            offset=at + 66,
        )
    return best, at


# ---------------------------------------------------------------------------------------
# region table (spec 2.2.3)


@dataclass(frozen=True)
class RegionEntry:
    """A region table entry (QEMU ``VHDXRegionTableEntry``)."""

    guid: bytes
    file_offset: int
    length: int
    required: bool


def parse_region_table(data: bytes, offset: int = 0) -> tuple[RegionEntry, ...]:
    """The entries of a 64 KiB region table found at file ``offset``.

    Raises :class:`TruncatedImage` for short data, :class:`FormatError` without the
    ``regi`` signature and :class:`CorruptImage` for a wrong CRC-32C, more than 2047
    entries or a GUID listed twice.
    """
    what = "vhdx region table"
    if len(data) < VHDX_REGION_TABLE_SIZE:
        raise TruncatedImage(
            f"{what} is truncated ({len(data)} of {VHDX_REGION_TABLE_SIZE} bytes)",
            structure=what,
            offset=offset,
        )
    block = bytes(data[:VHDX_REGION_TABLE_SIZE])
    rt = _parse(REGION_TABLE_HEADER, block, what, offset)
    if rt.signature != _REGION_SIGNATURE:
        raise FormatError(
            "VHDX region table signature 'regi' is missing",
            structure=what,
            field="signature",
            offset=offset,
        )
    if rt.checksum != _checksum(block):
        raise CorruptImage(
            "VHDX region table checksum is wrong",
            structure=what,
            field="checksum",
            offset=offset + _CHECKSUM_AT,
        )
    if rt.entry_count > VHDX_MAX_ENTRIES:
        raise CorruptImage(
            f"VHDX region table has {rt.entry_count} entries (limit {VHDX_MAX_ENTRIES})",
            structure=what,
            field="entry_count",
            offset=offset + 8,
        )
    entries: list[RegionEntry] = []
    for i in range(rt.entry_count):
        at = 16 + _REGION_ENTRY_SIZE * i
        e = _parse(REGION_ENTRY, block[at:], "vhdx region entry", offset + at)
        if any(r.guid == e.guid for r in entries):
            raise CorruptImage(
                f"VHDX region {guid_text(e.guid)} is listed twice",
                structure=what,
                field=f"entry[{i}]",
                offset=offset + at,
            )
        entries.append(RegionEntry(e.guid, e.file_offset, e.length, bool(e.data_bits & 1)))
    return tuple(entries)


def build_region_table(entries: Sequence[RegionEntry]) -> bytes:
    """The 64 KiB region table of ``entries`` with its CRC-32C.

    Raises :class:`FormatError` for more than 2047 entries or fields that do not fit.
    """
    if len(entries) > VHDX_MAX_ENTRIES:
        raise FormatError("too many VHDX region entries", structure="vhdx region table")
    out = bytearray(
        _build(
            REGION_TABLE_HEADER,
            {"signature": _REGION_SIGNATURE, "checksum": 0, "entry_count": len(entries)}
            | {"reserved": 0},
            "vhdx region table",
        )
    )
    for e in entries:
        out += _build(
            REGION_ENTRY,
            {
                "guid": e.guid,
                "file_offset": e.file_offset,
                "length": e.length,
                "data_bits": int(e.required),
            },
            "vhdx region entry",
        )
    return _with_checksum(bytes(out.ljust(VHDX_REGION_TABLE_SIZE, b"\0")))


def region_problems(
    entries: Sequence[RegionEntry], file_size: int, offset: int = 0
) -> list[QcowlibError]:
    """Everything refused in the entries of a region table (spec 2.2.3.1), in order.

    ``offset`` is where the table is (for messages).  :class:`UnsupportedFeature` for
    an unknown required region, :class:`CorruptImage` for a missing BAT or metadata
    region, one not 1 MiB aligned, inside the header section or overlapping another,
    and :class:`TruncatedImage` for one past the end of the file.
    """
    what = "vhdx region table"
    found: list[QcowlibError] = []
    for i, r in enumerate(entries):
        at = offset + 16 + _REGION_ENTRY_SIZE * i
        if r.guid not in (VHDX_BAT_GUID, VHDX_METADATA_GUID):
            if r.required:
                found.append(
                    UnsupportedFeature(
                        f"VHDX has an unknown required region {guid_text(r.guid)}",
                        structure=what,
                        field=f"entry[{i}]",
                        offset=at,
                    )
                )
            continue
        if r.file_offset % MIB or r.file_offset < VHDX_HEADER_SECTION_END or r.length % MIB:
            found.append(
                CorruptImage(
                    f"VHDX region {guid_text(r.guid)} is not 1 MiB aligned past the headers",
                    structure=what,
                    field=f"entry[{i}].file_offset",
                    offset=at + 16,
                )
            )
        elif r.file_offset + r.length > file_size:
            found.append(
                TruncatedImage(
                    f"VHDX region {guid_text(r.guid)} lies past the end of the file",
                    structure=what,
                    field=f"entry[{i}].file_offset",
                    offset=at + 16,
                )
            )
    by_guid = {r.guid: r for r in entries}
    for needed, name in ((VHDX_BAT_GUID, "BAT"), (VHDX_METADATA_GUID, "metadata")):
        if needed not in by_guid:
            found.append(CorruptImage(f"VHDX has no {name} region", structure=what, offset=offset))
    bat, meta = by_guid.get(VHDX_BAT_GUID), by_guid.get(VHDX_METADATA_GUID)
    if (
        bat is not None
        and meta is not None
        and bat.file_offset < meta.file_offset + meta.length
        and meta.file_offset < bat.file_offset + bat.length
    ):
        found.append(
            CorruptImage("VHDX BAT and metadata regions overlap", structure=what, offset=offset)
        )
    return found


def check_regions(
    entries: Sequence[RegionEntry], file_size: int, offset: int = 0
) -> tuple[RegionEntry, RegionEntry]:
    """The BAT and metadata regions of a region table, checked (spec 2.2.3.1).

    Raises the first of :func:`region_problems`.
    """
    problems = region_problems(entries, file_size, offset)
    if problems:
        raise problems[0]
    found = {r.guid: r for r in entries}
    return found[VHDX_BAT_GUID], found[VHDX_METADATA_GUID]


# ---------------------------------------------------------------------------------------
# metadata region (spec 2.6)


@dataclass(frozen=True)
class MetadataEntry:
    """A metadata table entry (QEMU ``VHDXMetadataTableEntry``)."""

    item_id: bytes
    offset: int
    length: int
    is_user: bool = False
    is_virtual_disk: bool = False
    is_required: bool = False


def parse_metadata_table(
    data: bytes, region_length: int, offset: int = 0
) -> tuple[MetadataEntry, ...]:
    """The entries of the 64 KiB metadata table at the start of the metadata region.

    ``region_length`` bounds the items; ``offset`` is the region's file offset.  Raises
    :class:`TruncatedImage` for short data, :class:`FormatError` without the
    ``metadata`` signature, :class:`CorruptImage` for more than 2047 entries, an item
    outside the region or one listed twice.
    """
    what = "vhdx metadata table"
    h = _parse(METADATA_HEADER, data, what, offset)
    if h.signature != _METADATA_SIGNATURE:
        raise FormatError(
            "VHDX metadata table signature 'metadata' is missing",
            structure=what,
            field="signature",
            offset=offset,
        )
    if h.entry_count > VHDX_MAX_ENTRIES:
        raise CorruptImage(
            f"VHDX metadata table has {h.entry_count} entries (limit {VHDX_MAX_ENTRIES})",
            structure=what,
            field="entry_count",
            offset=offset + 10,
        )
    entries: list[MetadataEntry] = []
    for i in range(h.entry_count):
        at = 32 + _METADATA_ENTRY_SIZE * i
        e = _parse(METADATA_ENTRY, data[at:], "vhdx metadata entry", offset + at)
        if e.length and (
            e.offset < VHDX_METADATA_TABLE_SIZE or e.offset + e.length > region_length
        ):
            raise CorruptImage(
                f"VHDX metadata item {guid_text(e.item_id)} lies outside its region",
                structure=what,
                field=f"entry[{i}].offset",
                offset=offset + at + 16,
            )
        if any(x.item_id == e.item_id for x in entries):
            raise CorruptImage(
                f"VHDX metadata item {guid_text(e.item_id)} is listed twice",
                structure=what,
                field=f"entry[{i}]",
                offset=offset + at,
            )
        entries.append(
            MetadataEntry(
                e.item_id,
                e.offset,
                e.length,
                is_user=bool(e.data_bits & VHDX_META_FLAGS_IS_USER),
                is_virtual_disk=bool(e.data_bits & VHDX_META_FLAGS_IS_VIRTUAL_DISK),
                is_required=bool(e.data_bits & VHDX_META_FLAGS_IS_REQUIRED),
            )
        )
    return tuple(entries)


def build_metadata_table(entries: Sequence[MetadataEntry]) -> bytes:
    """The 64 KiB metadata table of ``entries`` (no checksum: the spec has none)."""
    if len(entries) > VHDX_MAX_ENTRIES:
        raise FormatError("too many VHDX metadata entries", structure="vhdx metadata table")
    out = bytearray(
        _build(
            METADATA_HEADER,
            {"signature": _METADATA_SIGNATURE, "reserved": 0, "entry_count": len(entries)},
            "vhdx metadata table",
        )
    ).ljust(32, b"\0")
    for e in entries:
        bits = (
            (VHDX_META_FLAGS_IS_USER if e.is_user else 0)
            | (VHDX_META_FLAGS_IS_VIRTUAL_DISK if e.is_virtual_disk else 0)
            | (VHDX_META_FLAGS_IS_REQUIRED if e.is_required else 0)
        )
        out += _build(
            METADATA_ENTRY,
            {"item_id": e.item_id, "offset": e.offset, "length": e.length, "data_bits": bits},
            "vhdx metadata entry",
        ).ljust(_METADATA_ENTRY_SIZE, b"\0")
    return bytes(out.ljust(VHDX_METADATA_TABLE_SIZE, b"\0"))


@dataclass(frozen=True)
class Metadata:
    """The known metadata items (spec 2.6.2)."""

    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_disk_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83: bytes

    @property
    def chunk_ratio(self) -> int:
        return chunk_ratio(self.block_size, self.logical_sector_size)


#: The sizes of the items QEMU requires (``META_ALL_PRESENT``), by GUID.
_ITEM_SIZES: Final = {
    VHDX_FILE_PARAMETERS: ("file parameters", 8),
    VHDX_VIRTUAL_DISK_SIZE: ("virtual disk size", 8),
    VHDX_PAGE83: ("page 83 data", 16),
    VHDX_LOGICAL_SECTOR_SIZE: ("logical sector size", 4),
    VHDX_PHYSICAL_SECTOR_SIZE: ("physical sector size", 4),
}


def _metadata(
    entries: Sequence[MetadataEntry], items: Mapping[bytes, bytes], offset: int
) -> tuple[Metadata | None, list[QcowlibError]]:
    """The known items and every problem found in them (None when there is one)."""
    what = "vhdx metadata"
    by_id = {e.item_id: e for e in entries}
    found: list[QcowlibError] = [
        UnsupportedFeature(
            f"VHDX has an unknown required metadata item {guid_text(e.item_id)}",
            structure=what,
            offset=offset + e.offset,
        )
        for e in entries
        if e.is_required and e.item_id not in VHDX_KNOWN_METADATA
    ]
    values: dict[bytes, bytes] = {}
    for gid, (name, size) in _ITEM_SIZES.items():
        entry = by_id.get(gid)
        raw = items.get(gid, b"")
        if entry is None or entry.length < size or len(raw) < size:
            found.append(
                CorruptImage(
                    f"VHDX metadata item '{name}' is missing or short",
                    structure=what,
                    field=name,
                    offset=offset + entry.offset if entry is not None else offset,
                )
            )
        else:
            values[gid] = bytes(raw[:size])
    if len(values) < len(_ITEM_SIZES):
        return None, found

    def at(gid: bytes) -> int:
        return offset + by_id[gid].offset

    params = values[VHDX_FILE_PARAMETERS]
    block_size = int.from_bytes(params[:4], "little")
    bits = int.from_bytes(params[4:8], "little")
    if (
        block_size < VHDX_BLOCK_SIZE_MIN
        or block_size > VHDX_BLOCK_SIZE_MAX
        or block_size & (block_size - 1)
    ):
        found.append(
            CorruptImage(
                f"VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB",
                structure=what,
                field="block_size",
                offset=at(VHDX_FILE_PARAMETERS),
            )
        )
    sizes = []
    for gid, name in (
        (VHDX_LOGICAL_SECTOR_SIZE, "logical_sector_size"),
        (VHDX_PHYSICAL_SECTOR_SIZE, "physical_sector_size"),
    ):
        n = int.from_bytes(values[gid], "little")
        if n not in (512, 4096):
            found.append(
                CorruptImage(
                    f"VHDX {name.replace('_', ' ')} {n} is not 512 or 4096",
                    structure=what,
                    field=name,
                    offset=at(gid),
                )
            )
        sizes.append(n)
    disk_size = int.from_bytes(values[VHDX_VIRTUAL_DISK_SIZE], "little")
    if disk_size > VHDX_MAX_SIZE or disk_size % sizes[0]:
        found.append(
            CorruptImage(
                f"VHDX virtual disk size {disk_size} is above 64 TiB or not whole sectors",
                structure=what,
                field="virtual_disk_size",
                offset=at(VHDX_VIRTUAL_DISK_SIZE),
            )
        )
    if found:
        return None, found
    metadata = Metadata(
        block_size=block_size,
        leave_blocks_allocated=bool(bits & VHDX_PARAMS_LEAVE_BLOCKS_ALLOCATED),
        has_parent=bool(bits & VHDX_PARAMS_HAS_PARENT),
        virtual_disk_size=disk_size,
        logical_sector_size=sizes[0],
        physical_sector_size=sizes[1],
        page83=values[VHDX_PAGE83],
    )
    return metadata, []


def metadata_problems(
    entries: Sequence[MetadataEntry], items: Mapping[bytes, bytes], offset: int = 0
) -> list[QcowlibError]:
    """Everything :func:`decode_metadata` refuses, in order (empty: it decodes)."""
    return _metadata(entries, items, offset)[1]


def decode_metadata(
    entries: Sequence[MetadataEntry], items: Mapping[bytes, bytes], offset: int = 0
) -> Metadata:
    """The known items, from the table ``entries`` and each item's bytes in ``items``.

    ``items`` maps item GUIDs to their bytes (read by the caller from the metadata
    region at ``offset`` + entry offset; at least the sizes the spec gives).  Raises
    :class:`UnsupportedFeature` for an unknown required item, :class:`CorruptImage`
    for a missing or short item, a block size that is not a power of two from 1 MiB to
    256 MiB, a sector size other than 512 or 4096, or a disk size that is not a
    multiple of the logical sector size or above 64 TiB.
    """
    metadata, problems = _metadata(entries, items, offset)
    if metadata is None:
        raise problems[0]
    return metadata


#: Key/value pairs read from one parent locator.
VHDX_MAX_LOCATOR_ENTRIES: Final = 256


def parse_parent_locator(data: bytes) -> dict[str, str]:
    """The key/value pairs of a parent locator item (spec 2.6.2.6), UTF-16LE decoded.

    Lenient: undecodable text is replaced, at most :data:`VHDX_MAX_LOCATOR_ENTRIES`
    pairs are read, and a key or value outside ``data`` reads as what of it is inside.
    Raises :class:`TruncatedImage` when ``data`` is shorter than the entries it lists.
    """
    h = _parse(LOCATOR_HEADER, data, "vhdx parent locator", 0)
    pairs: dict[str, str] = {}
    for i in range(min(h.key_value_count, VHDX_MAX_LOCATOR_ENTRIES)):
        at = 20 + 12 * i
        e = _parse(LOCATOR_ENTRY, data[at:], "vhdx parent locator entry", at)
        key = data[e.key_offset : e.key_offset + e.key_length]
        value = data[e.value_offset : e.value_offset + e.value_length]
        pairs[key.decode("utf-16-le", "replace")] = value.decode("utf-16-le", "replace")
    return pairs


def build_metadata_items(m: Metadata) -> tuple[tuple[MetadataEntry, ...], bytes]:
    """The table entries and the item bytes (placed at 64 KiB in the region) for ``m``.

    The order and flags are those ``qemu-img create`` writes.  Raises
    :class:`FormatError` when a value does not fit its field.
    """
    bits = (VHDX_PARAMS_LEAVE_BLOCKS_ALLOCATED if m.leave_blocks_allocated else 0) | (
        VHDX_PARAMS_HAS_PARENT if m.has_parent else 0
    )
    try:
        parts = [
            (VHDX_FILE_PARAMETERS, m.block_size.to_bytes(4, "little") + bits.to_bytes(4, "little")),
            (VHDX_VIRTUAL_DISK_SIZE, m.virtual_disk_size.to_bytes(8, "little")),
            (VHDX_PAGE83, bytes(m.page83).ljust(16, b"\0")[:16]),
            (VHDX_LOGICAL_SECTOR_SIZE, m.logical_sector_size.to_bytes(4, "little")),
            (VHDX_PHYSICAL_SECTOR_SIZE, m.physical_sector_size.to_bytes(4, "little")),
        ]
    except OverflowError as exc:
        raise FormatError(f"cannot build vhdx metadata: {exc}", structure="vhdx metadata") from None
    entries = []
    data = bytearray()
    for gid, raw in parts:
        entries.append(
            MetadataEntry(
                gid,
                VHDX_METADATA_TABLE_SIZE + len(data),
                len(raw),
                is_virtual_disk=gid != VHDX_FILE_PARAMETERS,
                is_required=True,
            )
        )
        data += raw
    return tuple(entries), bytes(data)


# ---------------------------------------------------------------------------------------
# block allocation table (spec 2.5)


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks per sector bitmap block: 2**23 sectors over sectors per block."""
    return VHDX_MAX_SECTORS_PER_BLOCK * logical_sector_size // block_size


def bat_entries(virtual_size: int, block_size: int, ratio: int, *, has_parent: bool) -> int:
    """The number of BAT entries (spec 2.5; QEMU ``vhdx_calc_bat_entries``).

    A non-differencing disk has no sector bitmap entry after its last chunk.
    """
    blocks = -(-virtual_size // block_size)
    bitmaps = -(-blocks // ratio)
    if has_parent:
        return bitmaps * (ratio + 1)
    if blocks == 0:
        return 0
    return blocks + (blocks - 1) // ratio


def bat_size(m: Metadata, region: RegionEntry) -> int:
    """The BAT entries of a disk without parent, checked to fit the BAT ``region``.

    Raises :class:`TruncatedImage` when the region is too small for them.
    """
    entries = bat_entries(m.virtual_disk_size, m.block_size, m.chunk_ratio, has_parent=False)
    if entries * 8 > region.length:
        raise TruncatedImage(
            f"VHDX BAT region of {region.length} bytes is too small for {entries} entries",
            structure="vhdx region table",
            field="bat.length",
            offset=VHDX_REGION_TABLE_OFFSETS[0],
        )
    return entries


def payload_bat_index(first: int, stop: int, ratio: int) -> npt.NDArray[np.int64]:
    """BAT indexes of payload blocks ``first`` to ``stop - 1``."""
    import numpy as np

    blocks = np.arange(first, stop, dtype=np.int64)
    return blocks + blocks // ratio


def decode_bat(raw: bytes, entries: int, offset: int = 0) -> BatArray:
    """The BAT as native ``uint64`` entries.

    Raises :class:`TruncatedImage` when ``raw`` holds fewer than ``entries`` entries.
    """
    import numpy as np

    if entries < 0 or len(raw) < entries * 8:
        raise TruncatedImage(
            f"VHDX BAT is truncated ({len(raw)} of {entries * 8} bytes)",
            structure="vhdx bat",
            offset=offset,
        )
    return np.frombuffer(raw, dtype=np.dtype(_U64LE), count=entries).astype(np.uint64)


def encode_bat(bat: BatArray) -> bytes:
    """The on-disk bytes of a BAT (little-endian)."""
    import numpy as np

    return np.asarray(bat, dtype=np.uint64).astype(np.dtype(_U64LE)).tobytes()


def bat_states(bat: BatArray) -> npt.NDArray[np.uint8]:
    """The state (bits 0-2) of each entry."""
    import numpy as np

    return (bat & np.uint64(BAT_STATE_MASK)).astype(np.uint8)


def bat_offsets(bat: BatArray) -> npt.NDArray[np.uint64]:
    """The file offset (bits 20-63, in MiB) of each entry, in bytes."""
    import numpy as np

    return (bat >> np.uint64(_BAT_OFFSET_SHIFT)) << np.uint64(_BAT_OFFSET_SHIFT)


def check_bat(
    bat: BatArray, m: Metadata, file_size: int, bat_offset: int = 0
) -> npt.NDArray[np.uint64]:
    """Check the payload entries of a non-differencing disk; returns them.

    Raises :class:`CorruptImage` for an unknown state, a partially present block (only
    differencing disks have them) or a present block inside the header section, and
    :class:`TruncatedImage` for a present block whose guest-visible part ends past the
    end of the file (QEMU: "VHDX BAT data block offset past EOF").
    """
    import numpy as np

    ratio = m.chunk_ratio
    n_blocks = -(-m.virtual_disk_size // m.block_size)
    idx = payload_bat_index(0, n_blocks, ratio)
    if idx.size and int(idx[-1]) >= bat.size:
        raise TruncatedImage(
            "VHDX BAT is too short for the disk size", structure="vhdx bat", offset=bat_offset
        )
    payload = bat[idx]
    states = bat_states(payload)
    bad = np.flatnonzero(~np.isin(states, _PAYLOAD_STATES) | (states == 7))
    if bad.size:
        i = int(bad[0])
        raise CorruptImage(
            f"VHDX payload block {i} has state {int(states[i])}, invalid in a disk without parent",
            structure="vhdx bat",
            field=f"entry[{int(idx[i])}]",
            offset=bat_offset + 8 * int(idx[i]),
        )
    present = states == PAYLOAD_BLOCK_FULLY_PRESENT
    offsets = bat_offsets(payload)
    lengths = np.full(n_blocks, m.block_size, dtype=np.uint64)
    if n_blocks:
        lengths[-1] = m.virtual_disk_size - (n_blocks - 1) * m.block_size
    low = present & (offsets < np.uint64(VHDX_HEADER_SECTION_END))
    past = present & (offsets + lengths > np.uint64(file_size))
    for mask, error, text in (
        (low, CorruptImage, "lies inside the VHDX header section"),
        (past, TruncatedImage, "lies past the end of the file"),
    ):
        hit = np.flatnonzero(mask)
        if hit.size:
            i = int(hit[0])
            raise error(
                f"VHDX payload block {i} at {int(offsets[i]):#x} {text}",
                structure="vhdx bat",
                field=f"entry[{int(idx[i])}]",
                offset=bat_offset + 8 * int(idx[i]),
            )
    return payload
