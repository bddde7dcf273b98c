"""VHD footer, checksums and geometry (Virtual Hard Disk Image Format Specification)."""

from __future__ import annotations

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

if TYPE_CHECKING:
    # numpy is imported where tables are decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    BatArray = npt.NDArray[np.uint32]


SECTOR: Final = 512
FOOTER_SIZE: Final = 512
DYNAMIC_HEADER_SIZE: Final = 1024
VHD_COOKIE: Final = b"conectix"
VHD_DYNAMIC_COOKIE: Final = b"cxsparse"
VHD_TYPE_FIXED: Final = 2
VHD_TYPE_DYNAMIC: Final = 3
VHD_TYPE_DIFFERENCING: Final = 4
VHD_TYPE_NAMES: Final = {2: "fixed", 3: "dynamic", 4: "differencing"}
#: ``data_offset`` of a footer with no further structure (fixed disks; QEMU writes all
#: 64 bits set, the specification says 0xFFFFFFFF, Microsoft's tools expect 64 bits).
NO_DATA_OFFSET: Final = 0xFFFFFFFFFFFFFFFF
#: Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC (VHD time stamps count from it).
VHD_TIMESTAMP_BASE: Final = 946684800
#: The largest CHS geometry (cylinders x heads x sectors per track); an image with it
#: takes its size from ``current_size`` (QEMU: VHD_MAX_GEOMETRY).
VHD_CHS_MAX_C: Final = 65535
VHD_CHS_MAX_H: Final = 16
VHD_CHS_MAX_S: Final = 255
VHD_MAX_GEOMETRY: Final = VHD_CHS_MAX_C * VHD_CHS_MAX_H * VHD_CHS_MAX_S
#: QEMU refuses images larger than 2040 GiB (VHD_MAX_SECTORS).
VHD_MAX_SECTORS: Final = 0xFF000000
#: QEMU's cap on the BAT (``max_table_entries * 4`` must fit an ``int``).
VHD_MAX_TABLE_ENTRIES: Final = (1 << 31) // 4
#: The block size QEMU creates (2 MiB).
DEFAULT_BLOCK_SIZE: Final = 0x200000
BAT_UNALLOCATED: Final = 0xFFFFFFFF
#: Creator applications whose images take their size from ``current_size`` rather than
#: the CHS geometry (QEMU ``vpc_open``): Hyper-V, QEMU with force_size, Disk2vhd,
#: XenConverter, XenServer.
CURRENT_SIZE_CREATORS: Final = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

FOOTER = cs.Struct(
    "cookie" / cs.Bytes(8),
    "features" / cs.Int32ub,
    "version" / cs.Int32ub,
    "data_offset" / cs.Int64ub,
    "timestamp" / cs.Int32ub,
    "creator_app" / cs.Bytes(4),
    "creator_ver" / cs.Int32ub,
    "creator_os" / cs.Bytes(4),
    "orig_size" / cs.Int64ub,
    "current_size" / cs.Int64ub,
    "cyls" / cs.Int16ub,
    "heads" / cs.Int8ub,
    "secs_per_cyl" / cs.Int8ub,
    "type" / cs.Int32ub,
    "checksum" / cs.Int32ub,
    "uuid" / cs.Bytes(16),
    "in_saved_state" / cs.Int8ub,
)
FOOTER_CHECKSUM_AT: Final = 64
PARENT_LOCATOR = cs.Struct(
    "platform" / cs.Bytes(4),
    "data_space" / cs.Int32ub,
    "data_length" / cs.Int32ub,
    "reserved" / cs.Int32ub,
    "data_offset" / cs.Int64ub,
)
DYNAMIC_HEADER = cs.Struct(
    "magic" / cs.Bytes(8),
    "data_offset" / cs.Int64ub,
    "table_offset" / cs.Int64ub,
    "version" / cs.Int32ub,
    "max_table_entries" / cs.Int32ub,
    "block_size" / cs.Int32ub,
    "checksum" / cs.Int32ub,
    "parent_uuid" / cs.Bytes(16),
    "parent_timestamp" / cs.Int32ub,
    "reserved" / cs.Int32ub,
    "parent_name" / cs.Bytes(512),
    "parent_locators" / cs.Array(8, PARENT_LOCATOR),
)
DYNAMIC_HEADER_CHECKSUM_AT: Final = 36


# ---------------------------------------------------------------------------------------
# checksums


def checksum(data: bytes | bytearray, skip_at: int) -> int:
    """Ones' complement of the byte sum of ``data``, the 4-byte field at ``skip_at`` as 0."""
    total = sum(data) - sum(data[skip_at : skip_at + 4])
    return ~total & 0xFFFFFFFF


def footer_checksum(raw: bytes | bytearray) -> int:
    """The checksum a 512-byte footer should carry."""
    return checksum(bytes(raw[:FOOTER_SIZE]), FOOTER_CHECKSUM_AT)


def dynamic_header_checksum(raw: bytes | bytearray) -> int:
    """The checksum a 1024-byte dynamic disk header should carry."""
    return checksum(bytes(raw[:DYNAMIC_HEADER_SIZE]), DYNAMIC_HEADER_CHECKSUM_AT)


def _parse(layout: Any, data: bytes, size: int, what: str, offset: int) -> Any:
    if len(data) < size:
        raise TruncatedImage(
            f"{what} is truncated ({len(data)} of {size} bytes)", structure=what, offset=offset
        )
    try:
        return layout.parse(bytes(data[: layout.sizeof()]))
    except cs.ConstructError as exc:  # pragma: no cover - fixed-size layouts
        raise FormatError(f"cannot parse {what}: {exc}", structure=what, offset=offset) from None


# ---------------------------------------------------------------------------------------
# footer


@dataclass(frozen=True)
class Footer:
    """The hard disk footer (spec section "Hard Disk Footer Format"; QEMU ``VHDFooter``)."""

    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_ver: int
    creator_os: bytes
    orig_size: int
    current_size: int
    cyls: int
    heads: int
    secs_per_cyl: int
    type: int
    checksum: int
    uuid: bytes
    in_saved_state: int

    @property
    def chs_sectors(self) -> int:
        return self.cyls * self.heads * self.secs_per_cyl

    @property
    def type_name(self) -> str:
        return VHD_TYPE_NAMES.get(self.type, f"type {self.type}")


def parse_footer(data: bytes, offset: int = 0, *, check_checksum: bool = True) -> Footer:
    """Parse a 512-byte footer found at file ``offset`` (for error messages).

    Raises :class:`TruncatedImage` for short data, :class:`FormatError` without the
    ``conectix`` cookie and, with ``check_checksum``, :class:`CorruptImage` when the
    checksum is wrong (QEMU: "Incorrect header checksum").
    """
    f = _parse(FOOTER, data, FOOTER_SIZE, "vhd footer", offset)
    if f.cookie != VHD_COOKIE:
        raise FormatError(
            "VHD footer cookie 'conectix' is missing",
            structure="vhd footer",
            field="cookie",
            offset=offset,
        )
    if check_checksum and f.checksum != footer_checksum(data):
        raise CorruptImage(
            "VHD footer checksum is wrong",
            structure="vhd footer",
            field="checksum",
            offset=offset + FOOTER_CHECKSUM_AT,
        )
    return Footer(
        features=f.features,
        version=f.version,
        data_offset=f.data_offset,
        timestamp=f.timestamp,
        creator_app=f.creator_app,
        creator_ver=f.creator_ver,
        creator_os=f.creator_os,
        orig_size=f.orig_size,
        current_size=f.current_size,
        cyls=f.cyls,
        heads=f.heads,
        secs_per_cyl=f.secs_per_cyl,
        type=f.type,
        checksum=f.checksum,
        uuid=f.uuid,
        in_saved_state=f.in_saved_state,
    )


def build_footer(f: Footer) -> bytes:
    """The 512 bytes of ``f`` with a freshly computed checksum (``f.checksum`` ignored).

    Raises :class:`FormatError` when a field does not fit its width.
    """
    try:
        raw = FOOTER.build(
            {
                "cookie": VHD_COOKIE,
                "features": f.features,
                "version": f.version,
                "data_offset": f.data_offset,
                "timestamp": f.timestamp,
                "creator_app": f.creator_app,
                "creator_ver": f.creator_ver,
                "creator_os": f.creator_os,
                "orig_size": f.orig_size,
                "current_size": f.current_size,
                "cyls": f.cyls,
                "heads": f.heads,
                "secs_per_cyl": f.secs_per_cyl,
                "type": f.type,
                "checksum": 0,
                "uuid": f.uuid,
                "in_saved_state": f.in_saved_state,
            }
        )
    except cs.ConstructError as exc:
        raise FormatError(f"cannot build vhd footer: {exc}", structure="vhd footer") from None
    out = bytearray(raw.ljust(FOOTER_SIZE, b"\0"))
    out[FOOTER_CHECKSUM_AT : FOOTER_CHECKSUM_AT + 4] = footer_checksum(out).to_bytes(4, "big")
    return bytes(out)


def locate_footer(head: bytes, tail: bytes, file_size: int) -> tuple[Footer, int]:
    """The footer QEMU's ``vpc_open`` uses and its file offset, checksum checked.

    ``head`` and ``tail`` are the first and the last :data:`FOOTER_SIZE` bytes of the
    file.  A dynamic disk starts with a copy of its footer; a copy that says "fixed" is
    the data of a fixed disk that happens to begin like a footer, so the end is used.
    Raises :class:`TruncatedImage` for a file shorter than a footer and what
    :func:`parse_footer` raises (no cookie, wrong checksum).
    """
    if file_size < FOOTER_SIZE:
        raise TruncatedImage("file is too short for a VHD footer", structure="vhd footer")
    tail_at = file_size - FOOTER_SIZE
    if head[:8] == VHD_COOKIE:
        footer = parse_footer(head, 0)
        if footer.type != VHD_TYPE_FIXED:
            return footer, 0
    return parse_footer(tail, tail_at), tail_at


def footer_problems(footer: Footer, at: int) -> list[QcowlibError]:
    """What is refused in the footer found at ``at`` (see :func:`locate_footer`).

    :class:`CorruptImage` for an unknown disk type and for a dynamic or differencing
    disk without its footer copy at offset 0 (QEMU would read it as a fixed disk,
    footer and tables as guest data).
    """
    if footer.type not in (VHD_TYPE_FIXED, VHD_TYPE_DYNAMIC, VHD_TYPE_DIFFERENCING):
        return [
            CorruptImage(
                f"VHD disk type {footer.type} is unknown",
                structure="vhd footer",
                field="type",
                offset=at + 60,
            )
        ]
    if footer.type in (VHD_TYPE_DYNAMIC, VHD_TYPE_DIFFERENCING) and at != 0:
        return [
            CorruptImage(
                f"{footer.type_name} VHD has no footer copy at offset 0",
                structure="vhd footer",
                field="cookie",
                offset=0,
            )
        ]
    return []


# ---------------------------------------------------------------------------------------
# geometry and size


def calculate_geometry(total_sectors: int) -> tuple[int, int, int]:
    """``(cyls, heads, secs_per_cyl)`` for ``total_sectors``, rounded down.

    The algorithm of the specification's appendix "CHS Calculation", as QEMU's
    ``calculate_geometry`` applies it (sizes above the largest geometry are clamped).
    """
    total_sectors = min(max(total_sectors, 0), VHD_MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cyls_times_heads = total_sectors // secs
    else:
        secs = 17
        cyls_times_heads = total_sectors // secs
        heads = max(4, -(-cyls_times_heads // 1024))
        if cyls_times_heads >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cyls_times_heads = total_sectors // secs
        if cyls_times_heads >= heads * 1024:
            secs, heads = 63, 16
            cyls_times_heads = total_sectors // secs
    return cyls_times_heads // heads, heads, secs


#: How far past the requested size QEMU's geometry search looks (its loop stops at the
#: first geometry that covers the size; a few thousand steps always suffice below the
#: largest geometry because consecutive geometries are at most 255*16 sectors apart).
_GEOMETRY_SEARCH: Final = 1 << 16


def create_geometry(size: int, *, force_size: bool = False) -> tuple[int, int, int, int]:
    """``(cyls, heads, secs_per_cyl, total_sectors)`` as ``vpc_co_create`` picks them.

    Without ``force_size`` the geometry is the smallest that covers ``size`` (rounded up
    to whole sectors) and the disk becomes exactly that geometry's size (larger than
    ``size`` unless it is CHS-exact); with it, or when no geometry covers the size, the
    geometry is the largest one and the size is ``size`` itself.  Raises
    :class:`UnsupportedFeature` above 2040 GiB.
    """
    sectors = -(-size // SECTOR)
    if force_size:
        cyls, heads, secs = VHD_CHS_MAX_C, VHD_CHS_MAX_H, VHD_CHS_MAX_S
    else:
        wanted = min(VHD_MAX_GEOMETRY, sectors)
        cyls = heads = secs = 0
        for i in range(_GEOMETRY_SEARCH):
            if cyls * heads * secs >= wanted:
                break
            cyls, heads, secs = calculate_geometry(wanted + i)
    if cyls * heads * secs == VHD_MAX_GEOMETRY:
        total = sectors
    else:
        total = cyls * heads * secs
    if total > VHD_MAX_SECTORS:
        raise UnsupportedFeature("VHD images are limited to 2040 GiB", structure="vhd footer")
    return cyls, heads, secs, total


def virtual_size(f: Footer, offset: int = 0) -> int:
    """The guest-visible size of the disk in bytes, as QEMU's ``vpc_open`` decides it.

    Virtual PC sizes a disk by its CHS geometry, Hyper-V and others by ``current_size``:
    images from the creators in :data:`CURRENT_SIZE_CREATORS`, and images with the
    largest geometry, use ``current_size`` (whole sectors), all others the geometry.
    Raises :class:`UnsupportedFeature` above 2040 GiB (QEMU: "Disk size is too large").
    """
    sectors = f.chs_sectors
    if f.creator_app in CURRENT_SIZE_CREATORS or sectors == VHD_MAX_GEOMETRY:
        sectors = f.current_size // SECTOR
    if sectors > VHD_MAX_SECTORS:
        raise UnsupportedFeature(
            f"VHD disk of {sectors} sectors is larger than 2040 GiB",
            structure="vhd footer",
            field="current_size",
            offset=offset + 48,
        )
    return sectors * SECTOR
