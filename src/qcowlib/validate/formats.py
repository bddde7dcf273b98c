"""Light structure parsing for the formats :mod:`qcowlib.validate` looks at.

Pure: every function here takes bytes (and, where it matters, the file size) and returns
frozen dataclasses.  Nothing opens a file; nothing follows a file name found inside an
image.  Fatal problems raise :class:`~qcowlib.errors.FormatError` subclasses naming the
structure, field and offset; problems that still let the structure be read are returned
as :class:`Problem` values so that ``validate`` can report every one of them.

Layouts follow the specifications they come from, with their field names:

* VMDK: VMware "Virtual Disk Format 5.0" (hosted sparse extent header, text descriptor,
  stream-optimized markers); QEMU ``block/vmdk.c`` for what it accepts.
* VHD ("vpc"): Microsoft "Virtual Hard Disk Image Format Specification" (footer, dynamic
  disk header, parent locators); QEMU ``block/vpc.c``.
* VHDX: [MS-VHDX] (file identifier, headers, region table, metadata region); QEMU
  ``block/vhdx.c``.
* VDI: VirtualBox ``VDIHeader1Plus``; QEMU ``block/vdi.c``.
* LUKS1: "LUKS On-Disk Format Specification" 1.2.3.
* MBR and GPT: UEFI 2.10 chapter 5.
* ISO 9660: ECMA-119 volume descriptors.

:func:`inspector_view` reproduces which formats the OpenStack image inspector
(``oslo_utils.imageutils.format_inspector``, used by Glance) sees in the same bytes, so
that the ``glance`` policy can agree with Glance on format matching.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

import construct as cs

from qcowlib.errors import CorruptImage, FormatError, TruncatedImage
from qcowlib.formats import vhd, vhdx, vmdk
from qcowlib.formats._layout import parse_fixed as _parse
from qcowlib.formats.qcow2 import header as qcow2_header

SECTOR: Final = 512

# ---------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class Problem:
    """A structural problem that does not stop the rest of a structure being read."""

    message: str
    offset: int | None = None
    #: True when QEMU itself refuses the image because of it.
    fatal: bool = True


def printable(text: str, limit: int = 200) -> str:
    """``text`` made safe for one line of a message: control characters escaped, capped."""
    out = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def ones_complement_checksum(data: bytes, skip_at: int) -> int:
    """The VHD checksum: ones' complement of the byte sum, the checksum field as zero."""
    return vhd.checksum(bytes(data), skip_at)


crc32c = vhdx.crc32c


def _is_zero(raw: bytes) -> bool:
    return not any(raw)


# ---------------------------------------------------------------------------------------
# qcow2: the fields the safety rules read straight from the header bytes, so that they
# work even when the full parser (qcowlib.formats.qcow2.header) refuses the header.

QCOW_EXT_DATA_FILE: Final = qcow2_header.EXT_DATA_FILE
QCOW_EXT_END: Final = qcow2_header.EXT_END
#: Header extensions looked at: they all live in the first cluster (at most 2 MiB).
_QCOW_MAX_EXTENSIONS: Final = 4096


@dataclass(frozen=True)
class Qcow2Fields:
    """The qcow2 header fields the safety rules need, read without validation."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    incompatible_features: int = 0
    header_length: int = 72
    #: Name in the external data file extension, if one is present (decoded leniently).
    data_file_extension: str | None = None


def qcow2_fields(head: bytes) -> Qcow2Fields:
    """Read the qcow2 header fields from the first bytes of the file, leniently.

    Raises :class:`FormatError` for a bad magic and :class:`TruncatedImage` when the
    header is shorter than its version needs.
    """
    raw = _parse(qcow2_header.HEADER_V2, head, "qcow2 header", 0)
    if raw.magic != qcow2_header.QCOW_MAGIC:
        raise FormatError("not a qcow2 image (bad magic)", structure="qcow2 header", offset=0)
    fields = Qcow2Fields(
        version=raw.version,
        backing_file_offset=raw.backing_file_offset,
        backing_file_size=raw.backing_file_size,
        cluster_bits=raw.cluster_bits,
        size=raw.size,
        crypt_method=raw.crypt_method,
    )
    if raw.version < 3:
        return fields
    v3 = _parse(qcow2_header.HEADER_V3_TAIL, head[72:], "qcow2 v3 header", 72)
    data_file = _qcow2_data_file_extension(head, v3.header_length, raw)
    return Qcow2Fields(
        version=raw.version,
        backing_file_offset=raw.backing_file_offset,
        backing_file_size=raw.backing_file_size,
        cluster_bits=raw.cluster_bits,
        size=raw.size,
        crypt_method=raw.crypt_method,
        incompatible_features=v3.incompatible_features,
        header_length=v3.header_length,
        data_file_extension=data_file,
    )


def _qcow2_data_file_extension(head: bytes, header_length: int, raw: Any) -> str | None:
    """The external data file name from the extension list, walked leniently."""
    if header_length < 104 or header_length % 8:
        return None
    limit = len(head)
    if 9 <= raw.cluster_bits <= 21:
        limit = min(limit, 1 << raw.cluster_bits)
    if raw.backing_file_offset and raw.backing_file_offset < limit:
        limit = raw.backing_file_offset
    offset = header_length
    for _ in range(_QCOW_MAX_EXTENSIONS):
        if offset + 8 > limit:
            return None
        ext_type, length = struct.unpack_from(">II", head, offset)
        if ext_type == QCOW_EXT_END or offset + 8 + length > limit:
            return None
        if ext_type == QCOW_EXT_DATA_FILE:
            name = head[offset + 8 : offset + 8 + length].split(b"\0", 1)[0]
            return name.decode("utf-8", "replace")
        offset += 8 + ((length + 7) & ~7)
    return None


# ---------------------------------------------------------------------------------------
# VMDK

# Layouts and constants are declared once, in qcowlib.formats.vmdk.
VMDK4_MAGIC: Final = vmdk.VMDK4_MAGIC
VMDK3_MAGIC: Final = vmdk.VMDK3_MAGIC
VMDK_DESC_MAX: Final = vmdk.VMDK_DESC_MAX
VMDK_DESC_SECTOR: Final = vmdk.VMDK_DESC_SECTOR
VMDK_GD_AT_END: Final = vmdk.VMDK_GD_AT_END
VMDK_MARKER_EOS: Final = vmdk.VMDK_MARKER_EOS
VMDK_MARKER_FOOTER: Final = vmdk.VMDK_MARKER_FOOTER
VMDK_MAX_EXTENTS: Final = vmdk.VMDK_MAX_EXTENTS
VMDK_FLAG_COMPRESSED: Final = vmdk.VMDK_FLAG_COMPRESSED
VMDK_FLAG_MARKERS: Final = vmdk.VMDK_FLAG_MARKERS
VmdkSparseHeader = vmdk.VmdkSparseHeader
VmdkExtent = vmdk.VmdkExtent
VmdkDescriptor = vmdk.VmdkDescriptor
parse_vmdk_sparse_header = vmdk.parse_vmdk_sparse_header
parse_vmdk_stream_footer = vmdk.parse_vmdk_stream_footer
parse_vmdk_descriptor = vmdk.parse_vmdk_descriptor


def vmdk_sparse_header_problems(h: VmdkSparseHeader, file_size: int) -> list[Problem]:
    """What QEMU's ``vmdk_open_vmdk4`` (and the image inspector) refuse in a header."""
    problems: list[Problem] = []
    if h.version not in (1, 2, 3):
        problems.append(Problem(f"VMDK header version {h.version} is not 1, 2 or 3", 4))
    if h.num_gtes_per_gt == 0 or h.num_gtes_per_gt > 512:
        problems.append(Problem(f"VMDK grain table size {h.num_gtes_per_gt} is outside 1..512", 44))
    if h.grain_size == 0 or h.grain_size & (h.grain_size - 1) or h.grain_size > 1 << 16:
        problems.append(Problem(f"VMDK grain size {h.grain_size} sectors is invalid", 20))
    if h.capacity >= (1 << 63) // SECTOR:
        problems.append(Problem(f"VMDK capacity {h.capacity} sectors is too large", 12))
    if h.desc_offset:
        if h.desc_size == 0:
            problems.append(Problem("VMDK embedded descriptor has size 0", 36))
        elif h.desc_offset * SECTOR >= file_size:
            problems.append(Problem("VMDK embedded descriptor lies past the end of the file", 28))
    if h.gd_offset != VMDK_GD_AT_END and h.gd_offset and h.gd_offset * SECTOR >= file_size:
        problems.append(Problem("VMDK grain directory lies past the end of the file", 56))
    return problems


def vmdk_stream_footer_problems(h: VmdkSparseHeader, tail: bytes) -> list[Problem]:
    """The inspector's ``check_footer``: a header with ``gdOffset`` at the end needs a
    footer marker, a footer matching the header, and an end-of-stream marker."""
    try:
        marker, footer, eos = parse_vmdk_stream_footer(tail)
    except FormatError as exc:
        return [Problem(f"VMDK stream footer: {exc.message}")]
    problems: list[Problem] = []
    pad = bytes(496)
    if marker.size != 0 or marker.type != VMDK_MARKER_FOOTER or marker.pad != pad:
        problems.append(Problem("VMDK footer marker is invalid"))
    if footer.version != h.version:
        problems.append(Problem("VMDK footer and header versions differ"))
    if (footer.desc_offset, footer.desc_size) != (h.desc_offset, h.desc_size):
        problems.append(Problem("VMDK footer names a different descriptor than the header"))
    if footer.gd_offset == VMDK_GD_AT_END:
        problems.append(Problem("VMDK footer points to yet another footer"))
    if eos.val != 0 or eos.size != 0 or eos.type != VMDK_MARKER_EOS or eos.pad != pad:
        problems.append(Problem("VMDK end-of-stream marker is invalid"))
    return problems


# ---------------------------------------------------------------------------------------
# VHD (vpc)

# Layouts and constants are declared once, in qcowlib.formats.vhd.
VHD_COOKIE: Final = vhd.VHD_COOKIE
VHD_DYNAMIC_COOKIE: Final = vhd.VHD_DYNAMIC_COOKIE
VHD_FOOTER_SIZE: Final = vhd.FOOTER_SIZE
VHD_DYNAMIC_HEADER_SIZE: Final = vhd.DYNAMIC_HEADER_SIZE
VHD_TYPE_FIXED: Final = vhd.VHD_TYPE_FIXED
VHD_TYPE_DYNAMIC: Final = vhd.VHD_TYPE_DYNAMIC
VHD_TYPE_DIFFERENCING: Final = vhd.VHD_TYPE_DIFFERENCING
VHD_TYPE_NAMES: Final = vhd.VHD_TYPE_NAMES
#: QEMU's cap on the block allocation table (vpc.c: max_table_entries * 4 <= INT_MAX).
VHD_MAX_TABLE_ENTRIES: Final = vhd.VHD_MAX_TABLE_ENTRIES
#: 2 TiB less a little: the largest VHD the specification's 32-bit sector numbers allow.
VHD_MAX_SIZE: Final = 0xFFFFFFFF * SECTOR

_VhdFooter = vhd.FOOTER
_VhdDynamicHeader = vhd.DYNAMIC_HEADER


@dataclass(frozen=True)
class VhdFooter:
    """The VHD hard disk footer (also copied at offset 0 of dynamic disks)."""

    data_offset: int
    current_size: int
    original_size: int
    disk_type: int
    creator_app: bytes
    checksum: int
    checksum_ok: bool


@dataclass(frozen=True)
class VhdDynamicHeader:
    """The dynamic disk header of a dynamic or differencing VHD."""

    table_offset: int
    max_table_entries: int
    block_size: int
    checksum_ok: bool
    parent_uuid: bytes
    parent_name: str
    #: ``(platform code, data offset, data length)`` of the parent locators in use.
    parent_locators: tuple[tuple[str, int, int], ...]


def parse_vhd_footer(data: bytes) -> VhdFooter:
    """Parse a 512-byte footer.  Raises :class:`FormatError` without the cookie."""
    f = _parse(_VhdFooter, data, "vhd footer", 0)
    if f.cookie != VHD_COOKIE:
        raise FormatError("VHD footer cookie 'conectix' is missing", structure="vhd footer")
    return VhdFooter(
        data_offset=f.data_offset,
        current_size=f.current_size,
        original_size=f.orig_size,
        disk_type=f.type,
        creator_app=f.creator_app,
        checksum=f.checksum,
        checksum_ok=f.checksum == ones_complement_checksum(bytes(data[:VHD_FOOTER_SIZE]), 64),
    )


def parse_vhd_dynamic_header(data: bytes) -> VhdDynamicHeader:
    """Parse a 1024-byte dynamic disk header.  Raises :class:`FormatError`."""
    h = _parse(_VhdDynamicHeader, data, "vhd dynamic header", 0)
    if h.magic != VHD_DYNAMIC_COOKIE:
        raise FormatError(
            "VHD dynamic disk header cookie 'cxsparse' is missing", structure="vhd dynamic header"
        )
    name = h.parent_name.decode("utf-16-be", "replace").split("\0", 1)[0]
    locators = tuple(
        (loc.platform.decode("ascii", "replace"), loc.data_offset, loc.data_length)
        for loc in h.parent_locators
        if loc.platform != bytes(4)
    )
    return VhdDynamicHeader(
        table_offset=h.table_offset,
        max_table_entries=h.max_table_entries,
        block_size=h.block_size,
        checksum_ok=h.checksum
        == ones_complement_checksum(bytes(data[:VHD_DYNAMIC_HEADER_SIZE]), 36),
        parent_uuid=h.parent_uuid,
        parent_name=name,
        parent_locators=locators,
    )


def vhd_dynamic_problems(f: VhdFooter, h: VhdDynamicHeader, file_size: int) -> list[Problem]:
    """What QEMU's ``vpc_open`` refuses in a dynamic disk header."""
    problems: list[Problem] = []
    bs = h.block_size
    if bs < SECTOR or bs & (bs - 1):
        problems.append(Problem(f"VHD block size {bs} is not a power of two of at least 512"))
        return problems
    if h.max_table_entries > VHD_MAX_TABLE_ENTRIES:
        problems.append(Problem(f"VHD block table of {h.max_table_entries} entries is too large"))
        return problems
    if h.max_table_entries * bs < f.current_size:
        problems.append(
            Problem(
                f"VHD block table ({h.max_table_entries} blocks of {bs} bytes) is too small "
                f"for the disk size {f.current_size}"
            )
        )
    if h.table_offset + h.max_table_entries * 4 > file_size:
        problems.append(
            Problem("VHD block allocation table lies past the end of the file", h.table_offset)
        )
    if not h.checksum_ok:
        problems.append(Problem("VHD dynamic header checksum is wrong", fatal=False))
    return problems


# ---------------------------------------------------------------------------------------
# VHDX

# The declarations live in qcowlib.formats.vhdx; the names here are kept for the rules.
VHDX_SIGNATURE: Final = vhdx.VHDX_SIGNATURE
VHDX_HEADER_OFFSETS: Final = vhdx.VHDX_HEADER_OFFSETS
VHDX_HEADER_SIZE: Final = vhdx.VHDX_HEADER_SIZE
VHDX_REGION_TABLE_OFFSETS: Final = vhdx.VHDX_REGION_TABLE_OFFSETS
VHDX_REGION_TABLE_SIZE: Final = vhdx.VHDX_REGION_TABLE_SIZE
VHDX_HEADER_AREA: Final = vhdx.VHDX_HEADER_AREA
VHDX_METADATA_TABLE_SIZE: Final = vhdx.VHDX_METADATA_TABLE_SIZE
VHDX_MAX_ENTRIES: Final = vhdx.VHDX_MAX_ENTRIES
VHDX_MAX_SIZE: Final = vhdx.VHDX_MAX_SIZE
VHDX_MAX_LOCATOR: Final = vhdx.VHDX_MAX_LOCATOR
VHDX_BAT_GUID: Final = vhdx.VHDX_BAT_GUID
VHDX_METADATA_GUID: Final = vhdx.VHDX_METADATA_GUID
VHDX_FILE_PARAMETERS: Final = vhdx.VHDX_FILE_PARAMETERS
VHDX_VIRTUAL_DISK_SIZE: Final = vhdx.VHDX_VIRTUAL_DISK_SIZE
VHDX_PAGE83: Final = vhdx.VHDX_PAGE83
VHDX_LOGICAL_SECTOR_SIZE: Final = vhdx.VHDX_LOGICAL_SECTOR_SIZE
VHDX_PHYSICAL_SECTOR_SIZE: Final = vhdx.VHDX_PHYSICAL_SECTOR_SIZE
VHDX_PARENT_LOCATOR: Final = vhdx.VHDX_PARENT_LOCATOR
_VHDX_KNOWN_METADATA: Final = vhdx.VHDX_KNOWN_METADATA
VHDX_PARAMS_HAS_PARENT: Final = vhdx.VHDX_PARAMS_HAS_PARENT

_VhdxHeader = vhdx.HEADER
_VhdxRegionTableHeader = vhdx.REGION_TABLE_HEADER
_VhdxRegionEntry = vhdx.REGION_ENTRY
_VhdxMetadataHeader = vhdx.METADATA_HEADER
_VhdxMetadataEntry = vhdx.METADATA_ENTRY
_VhdxLocatorHeader = vhdx.LOCATOR_HEADER
_VhdxLocatorEntry = vhdx.LOCATOR_ENTRY


@dataclass(frozen=True)
class VhdxRegion:
    guid: bytes
    file_offset: int
    length: int
    required: bool


@dataclass(frozen=True)
class VhdxMetadataItem:
    item_id: bytes
    offset: int
    length: int
    required: bool


@dataclass(frozen=True)
class VhdxLayout:
    """What the first 320 KiB of a VHDX say: the current header and the region table."""

    log_needs_replay: bool
    regions: tuple[VhdxRegion, ...]
    problems: tuple[Problem, ...]

    def region(self, guid: bytes) -> VhdxRegion | None:
        return next((r for r in self.regions if r.guid == guid), None)


def parse_vhdx_layout(area: bytes, file_size: int) -> VhdxLayout:
    """Check the identifier, headers and region table in the first 320 KiB.

    Raises :class:`FormatError` when no valid header or region table exists (QEMU's
    "No valid VHDX header found" / region table errors).
    """
    if area[:8] != VHDX_SIGNATURE:
        raise FormatError("VHDX file identifier 'vhdxfile' is missing", structure="vhdx")
    problems: list[Problem] = []
    best = None
    for at in VHDX_HEADER_OFFSETS:
        block = bytes(area[at : at + VHDX_HEADER_SIZE])
        if len(block) < VHDX_HEADER_SIZE:
            continue
        h = _parse(_VhdxHeader, block, "vhdx header", at)
        if h.signature != b"head":
            continue
        if crc32c(block[:4] + bytes(4) + block[8:]) != h.checksum:
            problems.append(Problem("VHDX header checksum is wrong", at, fatal=False))
            continue
        if best is None or h.sequence_number > best.sequence_number:
            best = h
    if best is None:
        raise TruncatedImage(
            "no valid VHDX header found" if len(area) >= VHDX_HEADER_AREA else "VHDX is truncated",
            structure="vhdx header",
            offset=VHDX_HEADER_OFFSETS[0],
        )
    if best.version != 1:
        problems.append(Problem(f"VHDX header version {best.version} is not 1"))
    regions: tuple[VhdxRegion, ...] | None = None
    for at in VHDX_REGION_TABLE_OFFSETS:
        block = bytes(area[at : at + VHDX_REGION_TABLE_SIZE])
        if len(block) < VHDX_REGION_TABLE_SIZE:
            continue
        rt = _parse(_VhdxRegionTableHeader, block, "vhdx region table", at)
        if rt.signature != b"regi" or rt.entry_count > VHDX_MAX_ENTRIES:
            continue
        if crc32c(block[:4] + bytes(4) + block[8:]) != rt.checksum:
            problems.append(Problem("VHDX region table checksum is wrong", at, fatal=False))
            continue
        found = []
        for i in range(rt.entry_count):
            e = _parse(_VhdxRegionEntry, block[16 + 32 * i :], "vhdx region entry", at + 16)
            found.append(VhdxRegion(e.guid, e.file_offset, e.length, bool(e.data_bits & 1)))
        regions = tuple(found)
        break
    if regions is None:
        raise CorruptImage(
            "no valid VHDX region table found",
            structure="vhdx region table",
            offset=VHDX_REGION_TABLE_OFFSETS[0],
        )
    for r in regions:
        if r.guid not in (VHDX_BAT_GUID, VHDX_METADATA_GUID) and r.required:
            problems.append(Problem(f"VHDX has an unknown required region {_guid_text(r.guid)}"))
        if r.file_offset % (1 << 20) or r.file_offset < (1 << 20):
            problems.append(Problem("VHDX region is not 1 MiB aligned", r.file_offset))
        elif r.file_offset + r.length > file_size:
            problems.append(Problem("VHDX region lies past the end of the file", r.file_offset))
    for needed, name in ((VHDX_BAT_GUID, "BAT"), (VHDX_METADATA_GUID, "metadata")):
        if not any(r.guid == needed for r in regions):
            problems.append(Problem(f"VHDX has no {name} region"))
    return VhdxLayout(
        log_needs_replay=not _is_zero(best.log_guid),
        regions=regions,
        problems=tuple(problems),
    )


_guid_text = vhdx.guid_text


def parse_vhdx_metadata_table(table: bytes, region_length: int) -> list[VhdxMetadataItem]:
    """The entries of the metadata table (first 64 KiB of the metadata region)."""
    h = _parse(_VhdxMetadataHeader, table, "vhdx metadata table", 0)
    if h.signature != b"metadata":
        raise CorruptImage("VHDX metadata table signature is missing", structure="vhdx metadata")
    if h.entry_count > VHDX_MAX_ENTRIES:
        raise CorruptImage(
            f"VHDX metadata table has {h.entry_count} entries (limit 2047)",
            structure="vhdx metadata",
        )
    items = []
    for i in range(h.entry_count):
        e = _parse(_VhdxMetadataEntry, table[32 + 32 * i :], "vhdx metadata entry", 32 + 32 * i)
        if e.length and (
            e.offset < VHDX_METADATA_TABLE_SIZE or e.offset + e.length > region_length
        ):
            raise CorruptImage(
                f"VHDX metadata item {_guid_text(e.item_id)} lies outside its region",
                structure="vhdx metadata",
            )
        items.append(VhdxMetadataItem(e.item_id, e.offset, e.length, bool(e.data_bits & 4)))
    return items


def vhdx_unknown_required(items: list[VhdxMetadataItem]) -> list[str]:
    """Required metadata items QEMU does not know (it refuses such images)."""
    return [
        _guid_text(i.item_id) for i in items if i.required and i.item_id not in _VHDX_KNOWN_METADATA
    ]


def parse_vhdx_parent_locator(data: bytes) -> dict[str, str]:
    """The key/value pairs of a parent locator (UTF-16LE strings), leniently."""
    h = _parse(_VhdxLocatorHeader, data, "vhdx parent locator", 0)
    pairs: dict[str, str] = {}
    for i in range(min(h.key_value_count, 256)):
        e = _parse(_VhdxLocatorEntry, data[20 + 12 * i :], "vhdx parent locator entry", 0)
        key = data[e.key_offset : e.key_offset + e.key_length]
        value = data[e.value_offset : e.value_offset + e.value_length]
        pairs[key.decode("utf-16-le", "replace")] = value.decode("utf-16-le", "replace")
    return pairs


# ---------------------------------------------------------------------------------------
# VDI

VDI_SIGNATURE: Final = 0xBEDA107F
VDI_VERSION_1_1: Final = 0x00010001
VDI_TYPE_NAMES: Final = {1: "dynamic", 2: "static", 3: "undo", 4: "differencing"}
VDI_BLOCK_SIZE: Final = 1 << 20
#: QEMU's VDI_BLOCKS_IN_IMAGE_MAX: 0x3fffffff blocks are more than 1 EiB of disk.
VDI_BLOCKS_IN_IMAGE_MAX: Final = 0x3FFFFFFF

_VdiHeader = cs.Struct(
    "text" / cs.Bytes(64),
    "signature" / cs.Int32ul,
    "version" / cs.Int32ul,
    "header_size" / cs.Int32ul,
    "image_type" / cs.Int32ul,
    "image_flags" / cs.Int32ul,
    "description" / cs.Bytes(256),
    "offset_bmap" / cs.Int32ul,
    "offset_data" / cs.Int32ul,
    "cylinders" / cs.Int32ul,
    "heads" / cs.Int32ul,
    "sectors" / cs.Int32ul,
    "sector_size" / cs.Int32ul,
    "unused1" / cs.Int32ul,
    "disk_size" / cs.Int64ul,
    "block_size" / cs.Int32ul,
    "block_extra" / cs.Int32ul,
    "blocks_in_image" / cs.Int32ul,
    "blocks_allocated" / cs.Int32ul,
    "uuid_image" / cs.Bytes(16),
    "uuid_last_snap" / cs.Bytes(16),
    "uuid_link" / cs.Bytes(16),
    "uuid_parent" / cs.Bytes(16),
)


@dataclass(frozen=True)
class VdiHeader:
    version: int
    image_type: int
    offset_bmap: int
    offset_data: int
    sector_size: int
    disk_size: int
    block_size: int
    blocks_in_image: int
    uuid_link: bytes
    uuid_parent: bytes


def parse_vdi_header(data: bytes) -> VdiHeader:
    """Parse the 512-byte VDI pre-header and header.  Raises :class:`FormatError`."""
    h = _parse(_VdiHeader, data, "vdi header", 0)
    if h.signature != VDI_SIGNATURE:
        raise FormatError("VDI signature is missing", structure="vdi header", offset=0x40)
    return VdiHeader(
        version=h.version,
        image_type=h.image_type,
        offset_bmap=h.offset_bmap,
        offset_data=h.offset_data,
        sector_size=h.sector_size,
        disk_size=h.disk_size,
        block_size=h.block_size,
        blocks_in_image=h.blocks_in_image,
        uuid_link=h.uuid_link,
        uuid_parent=h.uuid_parent,
    )


def vdi_problems(h: VdiHeader, file_size: int) -> list[Problem]:
    """What QEMU's ``vdi_open`` refuses (``block/vdi.c``)."""
    problems: list[Problem] = []
    if h.version != VDI_VERSION_1_1:
        problems.append(
            Problem(f"VDI version {h.version >> 16}.{h.version & 0xFFFF} is not 1.1", 0x44)
        )
    if h.image_type not in (1, 2):
        name = VDI_TYPE_NAMES.get(h.image_type, str(h.image_type))
        problems.append(Problem(f"VDI image type {name} is not supported", 0x4C))
    if h.offset_bmap % SECTOR or h.offset_data % SECTOR:
        problems.append(Problem("VDI block map or data offset is not sector aligned", 0x154))
    if h.sector_size != SECTOR:
        problems.append(Problem(f"VDI sector size {h.sector_size} is not 512", 0x168))
    if h.block_size != VDI_BLOCK_SIZE:
        problems.append(Problem(f"VDI block size {h.block_size} is not 1 MiB", 0x178))
    if h.blocks_in_image > VDI_BLOCKS_IN_IMAGE_MAX:
        problems.append(Problem(f"VDI has too many blocks ({h.blocks_in_image})", 0x180))
    elif h.disk_size > h.blocks_in_image * VDI_BLOCK_SIZE:
        problems.append(
            Problem(
                f"VDI disk size {h.disk_size} is larger than its block map covers "
                f"({h.blocks_in_image} blocks)",
                0x170,
            )
        )
    if h.offset_bmap + h.blocks_in_image * 4 > file_size:
        problems.append(Problem("VDI block map lies past the end of the file", h.offset_bmap))
    if not _is_zero(h.uuid_link):
        problems.append(Problem("VDI has a non-null link UUID", 0x1A8))
    return problems


# ---------------------------------------------------------------------------------------
# LUKS

LUKS_MAGIC: Final = b"LUKS\xba\xbe"
LUKS_KEY_ENABLED: Final = 0x00AC71F3
LUKS_KEY_DISABLED: Final = 0x0000DEAD
_LuksKeySlot = cs.Struct(
    "active" / cs.Int32ub,
    "iterations" / cs.Int32ub,
    "salt" / cs.Bytes(32),
    "key_material_offset" / cs.Int32ub,
    "stripes" / cs.Int32ub,
)
_LuksHeader = cs.Struct(
    "magic" / cs.Bytes(6),
    "version" / cs.Int16ub,
    "cipher_name" / cs.Bytes(32),
    "cipher_mode" / cs.Bytes(32),
    "hash_spec" / cs.Bytes(32),
    "payload_offset" / cs.Int32ub,
    "key_bytes" / cs.Int32ub,
    "mk_digest" / cs.Bytes(20),
    "mk_digest_salt" / cs.Bytes(32),
    "mk_digest_iter" / cs.Int32ub,
    "uuid" / cs.Bytes(40),
    "key_slots" / cs.Array(8, _LuksKeySlot),
)
LUKS_HEADER_SIZE: Final = 592


@dataclass(frozen=True)
class LuksHeader:
    version: int
    cipher: str
    payload_offset: int
    key_bytes: int
    active_slots: int
    problems: tuple[Problem, ...]


def parse_luks_header(data: bytes, file_size: int) -> LuksHeader:
    """Parse a LUKS header: version 1 fully, version 2 only its magic and version."""
    if len(data) < 8 or data[:6] != LUKS_MAGIC:
        raise FormatError("LUKS magic is missing", structure="luks header", offset=0)
    version = int.from_bytes(data[6:8], "big")
    if version != 1:
        return LuksHeader(version, "", 0, 0, 0, ())
    h = _parse(_LuksHeader, data, "luks header", 0)
    problems: list[Problem] = []
    if h.key_bytes not in (16, 24, 32, 48, 64):
        problems.append(Problem(f"LUKS master key length {h.key_bytes} is invalid", 108))
    slots = [s for s in h.key_slots if s.active == LUKS_KEY_ENABLED]
    for i, s in enumerate(h.key_slots):
        if s.active not in (LUKS_KEY_ENABLED, LUKS_KEY_DISABLED):
            problems.append(Problem(f"LUKS key slot {i} has an invalid state", 208 + 48 * i))
    if not slots:
        problems.append(Problem("LUKS header has no active key slot", 208))
    if h.payload_offset * SECTOR > file_size:
        problems.append(Problem("LUKS payload offset is past the end of the file", 104))
    cipher = f"{_cstr(h.cipher_name)}-{_cstr(h.cipher_mode)}"
    return LuksHeader(version, cipher, h.payload_offset, h.key_bytes, len(slots), tuple(problems))


# ---------------------------------------------------------------------------------------
# MBR and GPT

MBR_SIGNATURE: Final = b"\x55\xaa"
MBR_PTE_START: Final = 446
MBR_TYPE_GPT_PROTECTIVE: Final = 0xEE
_MbrEntry = cs.Struct(
    "boot" / cs.Int8ul,
    "start_chs" / cs.Bytes(3),
    "os_type" / cs.Int8ul,
    "end_chs" / cs.Bytes(3),
    "start_lba" / cs.Int32ul,
    "size_lba" / cs.Int32ul,
)


@dataclass(frozen=True)
class MbrPartition:
    index: int
    boot: int
    start_chs: bytes
    os_type: int
    start_lba: int
    size_lba: int


def has_mbr_signature(sector0: bytes) -> bool:
    return len(sector0) >= SECTOR and sector0[510:512] == MBR_SIGNATURE


def looks_like_fat(sector0: bytes) -> bool:
    """A FAT volume boot record: two FATs and the fixed-disk media descriptor.

    The image inspector excludes these from its GPT/MBR detection.
    """
    return len(sector0) >= SECTOR and sector0[0x10] == 2 and sector0[0x15] == 0xF8


def parse_mbr(sector0: bytes) -> tuple[MbrPartition, ...]:
    """The four primary partition entries (all of them, including empty ones)."""
    if len(sector0) < SECTOR:
        raise TruncatedImage("MBR is truncated", structure="mbr", offset=0)
    out = []
    for i in range(4):
        at = MBR_PTE_START + 16 * i
        e = _parse(_MbrEntry, sector0[at : at + 16], "mbr partition entry", at)
        out.append(MbrPartition(i, e.boot, e.start_chs, e.os_type, e.start_lba, e.size_lba))
    return tuple(out)


def mbr_problems(parts: tuple[MbrPartition, ...]) -> list[Problem]:
    """The image inspector's ``mbr`` safety check on the partition table."""
    problems: list[Problem] = []
    used = []
    gpt = False
    for p in parts:
        at = MBR_PTE_START + 16 * p.index
        if p.boot not in (0x00, 0x80):
            problems.append(Problem(f"MBR partition {p.index} has an invalid boot flag", at))
        if p.os_type != 0:
            used.append(p.index)
        if p.os_type == MBR_TYPE_GPT_PROTECTIVE:
            gpt = True
            if p.start_chs != b"\x00\x02\x00":
                problems.append(Problem("protective MBR has an invalid start CHS", at + 1))
            if p.start_lba != 1:
                problems.append(Problem("protective MBR does not start at LBA 1", at + 8))
    if gpt and used != [0]:
        problems.append(Problem("protective MBR defines partitions besides the GPT one"))
    if not used:
        problems.append(Problem("MBR defines no partitions"))
    return problems


GPT_SIGNATURE: Final = b"EFI PART"
GPT_MAX_ENTRIES: Final = 1024
GPT_MAX_ENTRY_ARRAY: Final = 128 * 1024
_GptHeader = cs.Struct(
    "signature" / cs.Bytes(8),
    "revision" / cs.Int32ul,
    "header_size" / cs.Int32ul,
    "header_crc32" / cs.Int32ul,
    "reserved" / cs.Int32ul,
    "my_lba" / cs.Int64ul,
    "alternate_lba" / cs.Int64ul,
    "first_usable_lba" / cs.Int64ul,
    "last_usable_lba" / cs.Int64ul,
    "disk_guid" / cs.Bytes(16),
    "partition_entry_lba" / cs.Int64ul,
    "num_partition_entries" / cs.Int32ul,
    "partition_entry_size" / cs.Int32ul,
    "partition_entry_array_crc32" / cs.Int32ul,
)


@dataclass(frozen=True)
class GptHeader:
    my_lba: int
    alternate_lba: int
    partition_entry_lba: int
    num_partition_entries: int
    partition_entry_size: int
    partition_entry_array_crc32: int
    problems: tuple[Problem, ...]

    @property
    def entry_array_length(self) -> int:
        return self.num_partition_entries * self.partition_entry_size


def parse_gpt_header(block: bytes, block_size: int, disk_size: int) -> GptHeader:
    """Parse and check a GPT header found at LBA 1 (UEFI 2.10 section 5.3.2)."""
    at = block_size
    h = _parse(_GptHeader, block, "gpt header", at)
    if h.signature != GPT_SIGNATURE:
        raise FormatError("GPT header signature 'EFI PART' is missing", structure="gpt", offset=at)
    problems: list[Problem] = []
    if not 92 <= h.header_size <= block_size:
        problems.append(Problem(f"GPT header size {h.header_size} is invalid", at + 12))
    else:
        raw = bytearray(block[: h.header_size])
        raw[16:20] = bytes(4)
        if zlib.crc32(bytes(raw)) != h.header_crc32:
            problems.append(Problem("GPT header CRC32 is wrong", at + 16))
    if h.my_lba != 1:
        problems.append(Problem(f"GPT header says it is at LBA {h.my_lba}, not 1", at + 24))
    last_lba = disk_size // block_size - 1
    if h.alternate_lba > last_lba:
        problems.append(Problem("GPT backup header lies past the end of the disk", at + 32))
    if h.first_usable_lba > h.last_usable_lba or h.last_usable_lba > last_lba:
        problems.append(Problem("GPT usable LBA range is invalid", at + 40))
    if h.partition_entry_size < 128 or h.partition_entry_size % 8:
        problems.append(
            Problem(f"GPT partition entry size {h.partition_entry_size} is invalid", at + 84)
        )
    if h.num_partition_entries > GPT_MAX_ENTRIES:
        problems.append(
            Problem(f"GPT declares {h.num_partition_entries} partition entries", at + 80)
        )
    if h.partition_entry_lba < 2 or h.partition_entry_lba > last_lba:
        problems.append(Problem("GPT partition entry array LBA is invalid", at + 72))
    return GptHeader(
        my_lba=h.my_lba,
        alternate_lba=h.alternate_lba,
        partition_entry_lba=h.partition_entry_lba,
        num_partition_entries=h.num_partition_entries,
        partition_entry_size=h.partition_entry_size,
        partition_entry_array_crc32=h.partition_entry_array_crc32,
        problems=tuple(problems),
    )


# ---------------------------------------------------------------------------------------
# ISO 9660

ISO_DESCRIPTORS_AT: Final = 0x8000
ISO_DESCRIPTOR_SIZE: Final = 2048
#: Volume descriptors walked before giving up on finding the set terminator.
ISO_MAX_DESCRIPTORS: Final = 64
_IsoPrimary = cs.Struct(
    "type" / cs.Int8ul,
    "identifier" / cs.Bytes(5),
    "version" / cs.Int8ul,
    cs.Padding(73),
    "space_size_le" / cs.Int32ul,
    "space_size_be" / cs.Int32ub,
    cs.Padding(40),
    "block_size_le" / cs.Int16ul,
    "block_size_be" / cs.Int16ub,
)


@dataclass(frozen=True)
class IsoVolume:
    volume_size: int
    problems: tuple[Problem, ...]


def parse_iso_descriptors(area: bytes, file_size: int) -> IsoVolume:
    """Walk the volume descriptor set from 0x8000 (``area`` starts at 0x8000).

    Raises :class:`FormatError` when there is no primary volume descriptor.
    """
    problems: list[Problem] = []
    primary = None
    terminated = False
    for i in range(ISO_MAX_DESCRIPTORS):
        block = area[i * ISO_DESCRIPTOR_SIZE : (i + 1) * ISO_DESCRIPTOR_SIZE]
        if len(block) < 7:
            break
        at = ISO_DESCRIPTORS_AT + i * ISO_DESCRIPTOR_SIZE
        if block[1:6] != b"CD001":
            problems.append(Problem("ISO 9660 volume descriptor identifier is missing", at + 1))
            break
        if block[0] == 255:
            terminated = True
            break
        if block[0] == 1 and primary is None:
            primary = _parse(_IsoPrimary, block, "iso primary volume descriptor", at), at
    if primary is None:
        raise CorruptImage(
            "ISO 9660 image has no primary volume descriptor",
            structure="iso",
            offset=ISO_DESCRIPTORS_AT,
        )
    if not terminated:
        problems.append(Problem("ISO 9660 volume descriptor set has no terminator", fatal=False))
    pvd, at = primary
    if pvd.space_size_le != pvd.space_size_be or pvd.block_size_le != pvd.block_size_be:
        problems.append(Problem("ISO 9660 both-endian fields disagree", at + 80))
    bs = pvd.block_size_le
    if bs not in (512, 1024, 2048):
        problems.append(Problem(f"ISO 9660 logical block size {bs} is invalid", at + 128))
    size = pvd.space_size_le * bs
    if size > file_size:
        problems.append(
            Problem(f"ISO 9660 volume is {size} bytes but the file has only {file_size}", at + 80)
        )
    return IsoVolume(size, tuple(problems))


# ---------------------------------------------------------------------------------------
# what the OpenStack image inspector sees


#: The inspector's names where they differ from qemu-img's.
INSPECTOR_TO_QEMU: Final = {"vhd": "vpc"}
QEMU_TO_INSPECTOR: Final = {"vpc": "vhd"}
#: Formats the inspector knows (``format_inspector.ALL_FORMATS``).
INSPECTOR_FORMATS: Final = (
    "raw",
    "qcow2",
    "vhd",
    "vhdx",
    "vmdk",
    "vdi",
    "qed",
    "iso",
    "gpt",
    "luks",
)
_ISO_IDENTIFIERS: Final = (b"CD001", b"NSR02", b"NSR03")
#: How much of a stand-alone descriptor the inspector parses: the first chunk it is
#: handed.  64 KiB is what Glance's upload path hands it in practice.
_INSPECTOR_CHUNK: Final = 64 * 1024


@dataclass(frozen=True)
class InspectorView:
    """The formats the image inspector matches, and the one Glance then picks.

    ``format`` is None when several formats match (Glance refuses the upload), except
    that ``iso`` with ``gpt`` is ``iso`` (bootable ISOs carry an MBR).
    """

    matches: tuple[str, ...]
    format: str | None


def inspector_view(head: bytes, size: int) -> InspectorView:
    """Which formats the image inspector sees in a file (``head``: its first 64 KiB)."""
    matches = []
    sector0 = bytes(head[:SECTOR])
    if size >= SECTOR and sector0[:4] == qcow2_header.QCOW_MAGIC:
        matches.append("qcow2")
    if size >= SECTOR and sector0[:4] == b"QED\x00":
        matches.append("qed")
    if head[:8] == VHD_COOKIE:
        matches.append("vhd")
    if head[:8] == VHDX_SIGNATURE:
        matches.append("vhdx")
    if _inspector_vmdk(head, size):
        matches.append("vmdk")
    if size >= SECTOR and head[0x40:0x44] == struct.pack("<I", VDI_SIGNATURE):
        matches.append("vdi")
    if size >= 34 * 1024 and head[0x8001:0x8006] in _ISO_IDENTIFIERS:
        matches.append("iso")
    if size >= SECTOR and has_mbr_signature(sector0) and not looks_like_fat(sector0):
        matches.append("gpt")
    if head[:6] == LUKS_MAGIC:
        matches.append("luks")
    if set(matches) == {"iso", "gpt"}:
        return InspectorView(tuple(matches), "iso")
    if len(matches) > 1:
        return InspectorView(tuple(matches), None)
    return InspectorView(tuple(matches), matches[0] if matches else "raw")


def _inspector_vmdk(head: bytes, size: int) -> bool:
    if size < 64:
        return False
    if head[:4] == VMDK4_MAGIC:
        return True
    first = bytes(head[:SECTOR])
    try:
        text = first.decode("ascii")
    except UnicodeDecodeError:
        return False
    if not all(c.isprintable() or c.isspace() for c in text):
        return False
    desc = bytes(head[:_INSPECTOR_CHUNK]).split(b"\0", 1)[0]
    try:
        return 'createtype="' in desc.decode("ascii").lower()
    except UnicodeDecodeError:
        return False
