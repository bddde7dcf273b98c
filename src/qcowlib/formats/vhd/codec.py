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
* differencing (disk type 4): a dynamic layout over a parent image, not supported.
"""

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
    "parse_dynamic_header",
    "parse_footer",
    "virtual_size",
]

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

    :class:`UnsupportedFeature` for differencing disks (read without their parent they
    give wrong content), :class:`CorruptImage` for an unknown disk type and for a dynamic
    disk without its footer copy at offset 0 (QEMU would read it as a fixed disk,
    footer and tables as guest data).
    """
    if footer.type == VHD_TYPE_DIFFERENCING:
        return [
            UnsupportedFeature(
                "differencing VHD images are not supported",
                structure="vhd footer",
                field="type",
                offset=at + 60,
            )
        ]
    if footer.type not in (VHD_TYPE_FIXED, VHD_TYPE_DYNAMIC):
        return [
            CorruptImage(
                f"VHD disk type {footer.type} is unknown",
                structure="vhd footer",
                field="type",
                offset=at + 60,
            )
        ]
    if footer.type == VHD_TYPE_DYNAMIC and at != 0:
        return [
            CorruptImage(
                "dynamic VHD has no footer copy at offset 0",
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


# ---------------------------------------------------------------------------------------
# dynamic disk header


@dataclass(frozen=True)
class DynamicHeader:
    """The dynamic disk header (spec "Dynamic Disk Header Format"; QEMU ``VHDDynDiskHeader``)."""

    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    #: Raw UTF-16 big-endian parent name (512 bytes, NUL padded).
    parent_name: bytes = bytes(512)
    #: ``(platform, data_space, data_length, data_offset)`` for each of the 8 locators.
    parent_locators: tuple[tuple[bytes, int, int, int], ...] = ((bytes(4), 0, 0, 0),) * 8

    @property
    def parent_name_text(self) -> str:
        return self.parent_name.decode("utf-16-be", "replace").split("\0", 1)[0]


def parse_dynamic_header(data: bytes, offset: int = 0) -> DynamicHeader:
    """Parse a 1024-byte dynamic disk header found at file ``offset``.

    The checksum is not enforced (QEMU does not check it); compare ``checksum`` with
    :func:`dynamic_header_checksum` to know.  Raises :class:`TruncatedImage` for short
    data and :class:`FormatError` without the ``cxsparse`` cookie.
    """
    h = _parse(DYNAMIC_HEADER, data, DYNAMIC_HEADER_SIZE, "vhd dynamic header", offset)
    if h.magic != VHD_DYNAMIC_COOKIE:
        raise FormatError(
            "VHD dynamic disk header cookie 'cxsparse' is missing",
            structure="vhd dynamic header",
            field="magic",
            offset=offset,
        )
    return DynamicHeader(
        data_offset=h.data_offset,
        table_offset=h.table_offset,
        version=h.version,
        max_table_entries=h.max_table_entries,
        block_size=h.block_size,
        checksum=h.checksum,
        parent_uuid=h.parent_uuid,
        parent_timestamp=h.parent_timestamp,
        parent_name=h.parent_name,
        parent_locators=tuple(
            (loc.platform, loc.data_space, loc.data_length, loc.data_offset)
            for loc in h.parent_locators
        ),
    )


def build_dynamic_header(h: DynamicHeader) -> bytes:
    """The 1024 bytes of ``h`` with a freshly computed checksum (``h.checksum`` ignored)."""
    try:
        raw = DYNAMIC_HEADER.build(
            {
                "magic": VHD_DYNAMIC_COOKIE,
                "data_offset": h.data_offset,
                "table_offset": h.table_offset,
                "version": h.version,
                "max_table_entries": h.max_table_entries,
                "block_size": h.block_size,
                "checksum": 0,
                "parent_uuid": h.parent_uuid,
                "parent_timestamp": h.parent_timestamp,
                "reserved": 0,
                "parent_name": h.parent_name,
                "parent_locators": [
                    {
                        "platform": p,
                        "data_space": space,
                        "data_length": length,
                        "reserved": 0,
                        "data_offset": off,
                    }
                    for p, space, length, off in h.parent_locators
                ],
            }
        )
    except cs.ConstructError as exc:
        raise FormatError(
            f"cannot build vhd dynamic header: {exc}", structure="vhd dynamic header"
        ) from None
    out = bytearray(raw.ljust(DYNAMIC_HEADER_SIZE, b"\0"))
    at = DYNAMIC_HEADER_CHECKSUM_AT
    out[at : at + 4] = dynamic_header_checksum(out).to_bytes(4, "big")
    return bytes(out)


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap before each block, padded to whole sectors."""
    return -(-(block_size // (8 * SECTOR)) // SECTOR) * SECTOR


def dynamic_header_offset(footer: Footer, file_size: int) -> int:
    """Where the dynamic disk header of ``footer``'s disk is (its ``data_offset``).

    Raises :class:`TruncatedImage` when the header would end past the end of the file.
    """
    at = footer.data_offset
    if at > file_size - DYNAMIC_HEADER_SIZE:
        raise TruncatedImage(
            "VHD dynamic disk header lies past the end of the file",
            structure="vhd footer",
            field="data_offset",
            offset=16,
        )
    return at


def dynamic_problems(
    h: DynamicHeader, disk_size: int, file_size: int, offset: int = 0
) -> list[QcowlibError]:
    """Everything ``vpc_open`` refuses in a dynamic header, in the order it looks.

    ``disk_size`` is the virtual size (:func:`virtual_size`), ``offset`` where the header
    is in the file.  Returns :class:`CorruptImage` for a bad block size, a BAT that is
    too small for the disk or larger than :data:`VHD_MAX_TABLE_ENTRIES`, and
    :class:`TruncatedImage` when the BAT lies past the end of the file; the later checks
    are skipped when the block size or the table size is unusable.
    """
    what = "vhd dynamic header"
    bs = h.block_size
    if bs < SECTOR or bs & (bs - 1):
        return [
            CorruptImage(
                f"VHD block size {bs} is not a power of two of at least 512",
                structure=what,
                field="block_size",
                offset=offset + 32,
            )
        ]
    if disk_size // bs > 0xFFFFFFFF:
        return [CorruptImage("VHD has too many blocks", structure=what, field="block_size")]
    if h.max_table_entries > VHD_MAX_TABLE_ENTRIES:
        return [
            CorruptImage(
                f"VHD block table of {h.max_table_entries} entries is too large",
                structure=what,
                field="max_table_entries",
                offset=offset + 28,
            )
        ]
    problems: list[QcowlibError] = []
    if h.max_table_entries * bs < disk_size:
        problems.append(
            CorruptImage(
                f"VHD block table ({h.max_table_entries} blocks of {bs} bytes) is too small "
                f"for the disk size {disk_size}",
                structure=what,
                field="max_table_entries",
                offset=offset + 28,
            )
        )
    if h.table_offset + h.max_table_entries * 4 > file_size:
        problems.append(
            TruncatedImage(
                "VHD block allocation table lies past the end of the file",
                structure=what,
                field="table_offset",
                offset=h.table_offset,
            )
        )
    return problems


def check_dynamic(h: DynamicHeader, disk_size: int, file_size: int, offset: int = 0) -> None:
    """What ``vpc_open`` refuses in a dynamic header, before anything is allocated.

    Raises the first of :func:`dynamic_problems`.
    """
    problems = dynamic_problems(h, disk_size, file_size, offset)
    if problems:
        raise problems[0]


# ---------------------------------------------------------------------------------------
# block allocation table and sector bitmaps


def decode_bat(raw: bytes, entries: int) -> BatArray:
    """The BAT as native ``uint32`` sector numbers (:data:`BAT_UNALLOCATED`: none).

    Raises :class:`TruncatedImage` when ``raw`` holds fewer than ``entries`` entries.
    """
    import numpy as np

    if len(raw) < entries * 4:
        raise TruncatedImage(
            f"VHD block allocation table is truncated ({len(raw)} of {entries * 4} bytes)",
            structure="vhd bat",
        )
    return np.frombuffer(raw, dtype=np.dtype(">u4"), count=entries).astype(np.uint32)


def encode_bat(bat: BatArray) -> bytes:
    """The on-disk bytes of a BAT (big-endian), padded to whole sectors with 0xFF."""
    import numpy as np

    raw = np.asarray(bat, dtype=np.uint32).astype(np.dtype(">u4")).tobytes()
    pad = -len(raw) % SECTOR
    return raw + b"\xff" * pad


def check_bat(bat: BatArray, block_size: int, file_size: int, table_offset: int) -> None:
    """Refuse BAT entries whose block (bitmap and data) ends past the end of the file.

    QEMU: "free_data_block_offset points after the end of file".  Raises
    :class:`TruncatedImage` naming the first such entry and where it is in the file.
    """
    import numpy as np

    allocated = bat != BAT_UNALLOCATED
    ends = bat.astype(np.uint64) * np.uint64(SECTOR) + np.uint64(
        bitmap_size(block_size) + block_size
    )
    bad = np.flatnonzero(allocated & (ends > np.uint64(file_size)))
    if bad.size:
        i = int(bad[0])
        raise TruncatedImage(
            f"VHD block {i} at {int(bat[i]) * SECTOR:#x} lies past the end of the file",
            structure="vhd bat",
            field=f"entry[{i}]",
            offset=table_offset + 4 * i,
        )


def bitmap_runs(raw: bytes, sectors: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Runs of equal bits in the first ``sectors`` bits of a sector bitmap.

    Returns ``(starts, is_set)``: run ``i`` covers sectors ``starts[i]`` to
    ``starts[i + 1]`` (or ``sectors``).  Bits are most significant first.
    """
    import numpy as np

    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=sectors).astype(np.bool_)
    if sectors == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.bool_)
    change = np.flatnonzero(bits[1:] != bits[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    return starts, bits[starts]
