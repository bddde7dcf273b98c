"""VirtualBox VDI: pre-header, header version 1.1 and the block map.

Pure: :func:`parse_header` turns the first sector of a file into a :class:`VdiHeader`,
:func:`build_header` turns one back into bytes, :func:`decode_block_map` and
:func:`encode_block_map` convert the block map.  Nothing here opens a file; callers read
:func:`block_map_extent` bytes and hand them over.

Layout (VirtualBox ``VDICore.h``; QEMU ``block/vdi.c``, whose field names are used here)::

    0x000  pre-header: text[0x40], signature (0xbeda107f), version (0x00010001 = 1.1)
    0x048  header 1.1: header_size, image_type, image_flags, description[256],
           offset_bmap, offset_data, legacy geometry (cylinders, heads, sectors,
           sector_size), unused1, disk_size, block_size, block_extra,
           blocks_in_image, blocks_allocated, uuid_image, uuid_last_snap, uuid_link,
           uuid_parent
    0x200  (as QEMU and VirtualBox write it) the block map: one little-endian
           uint32 per block of ``block_size`` bytes, giving the index of the block in
           the data area at ``offset_data``, or VDI_UNALLOCATED / VDI_DISCARDED.

All integers are little-endian; UUIDs are stored in the little-endian (IPRT/Microsoft
GUID) byte order, i.e. :attr:`uuid.UUID.bytes_le`.
"""

from __future__ import annotations

import dataclasses
import uuid
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
    # numpy is imported where the block map is decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    U32 = npt.NDArray[np.uint32]

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "HEADER_AREA_SIZE",
    "HEADER_SIZE_V1_1",
    "PRE_HEADER_SIZE",
    "SECTOR_SIZE",
    "U32",
    "VDI_BLOCKS_IN_IMAGE_MAX",
    "VDI_DISCARDED",
    "VDI_DISK_SIZE_MAX",
    "VDI_SIGNATURE",
    "VDI_TEXT",
    "VDI_TYPE_DIFF",
    "VDI_TYPE_DYNAMIC",
    "VDI_TYPE_STATIC",
    "VDI_TYPE_UNDO",
    "VDI_UNALLOCATED",
    "VDI_VERSION_1_1",
    "VdiHeader",
    "VdiLayout",
    "block_map_extent",
    "build_header",
    "decode_block_map",
    "decode_header",
    "encode_block_map",
    "header_problems",
    "new_header",
    "parse_header",
    "plan_layout",
]

VDI_SIGNATURE: Final = 0xBEDA107F
VDI_VERSION_1_1: Final = 0x00010001
#: Image types (VirtualBox VDI_IMAGE_TYPE_NORMAL, _FIXED, _UNDO, _DIFF).
VDI_TYPE_DYNAMIC: Final = 1
VDI_TYPE_STATIC: Final = 2
VDI_TYPE_UNDO: Final = 3
VDI_TYPE_DIFF: Final = 4
#: Block map entry of a block never allocated (reads as zeros: there is no backing).
VDI_UNALLOCATED: Final = 0xFFFFFFFF
#: Block map entry of a discarded block (reads as zeros).
VDI_DISCARDED: Final = 0xFFFFFFFE

SECTOR_SIZE: Final = 512
#: The only block size VirtualBox and QEMU write (QEMU opens no other).
DEFAULT_BLOCK_SIZE: Final = 1024 * 1024
#: A block map entry is 32 bits and two values are reserved: QEMU caps the block count at
#: 0xffffffff / 4 so that the map itself stays addressable (4 GiB of map at most).
VDI_BLOCKS_IN_IMAGE_MAX: Final = 0x3FFFFFFF
VDI_DISK_SIZE_MAX: Final = VDI_BLOCKS_IN_IMAGE_MAX * DEFAULT_BLOCK_SIZE
#: The text QEMU puts in images it creates (its value does not matter to readers).
VDI_TEXT: Final = b"<<< QEMU VM Virtual Disk Image >>>\n"

PRE_HEADER_SIZE: Final = 0x48
#: header_size of a version 1.1 header as QEMU writes it (up to uuid_parent); VirtualBox
#: writes 0x190 (its LCHS geometry follows).  Both fit the first sector.
HEADER_SIZE_V1_1: Final = 0x180
#: The header sector: pre-header, header and padding; the block map follows it.
HEADER_AREA_SIZE: Final = 0x200

_TEXT_SIZE: Final = 0x40
_DESCRIPTION_SIZE: Final = 256

#: Pre-header (VirtualBox VDIPREHEADER: szFileInfo, u32Signature, u32Version).
PRE_HEADER = cs.Struct(
    "text" / cs.Bytes(_TEXT_SIZE),
    "signature" / cs.Int32ul,
    "version" / cs.Int32ul,
)
#: Header version 1.1 (VirtualBox VDIHEADER1), QEMU's names.
HEADER_V1_1 = cs.Struct(
    "header_size" / cs.Int32ul,
    "image_type" / cs.Int32ul,
    "image_flags" / cs.Int32ul,
    "description" / cs.Bytes(_DESCRIPTION_SIZE),
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
assert PRE_HEADER.sizeof() == PRE_HEADER_SIZE
assert HEADER_V1_1.sizeof() == HEADER_SIZE_V1_1

#: File offsets of the fields named in errors.
_AT: Final[dict[str, int]] = {
    "text": 0,
    "signature": 0x40,
    "version": 0x44,
    "header_size": 0x48,
    "image_type": 0x4C,
    "offset_bmap": 0x154,
    "offset_data": 0x158,
    "sector_size": 0x168,
    "disk_size": 0x170,
    "block_size": 0x178,
    "block_extra": 0x17C,
    "blocks_in_image": 0x180,
    "blocks_allocated": 0x184,
    "uuid_link": 0x1A8,
    "uuid_parent": 0x1B8,
}
_NIL = uuid.UUID(int=0)


@dataclass(frozen=True)
class VdiHeader:
    """A parsed VDI pre-header and version 1.1 header (QEMU's ``VdiHeader`` names).

    ``text`` and ``description`` are the bytes before the first NUL; UUIDs are
    :class:`uuid.UUID` values (converted from the on-disk little-endian order).
    """

    text: bytes
    image_type: int
    offset_bmap: int
    offset_data: int
    disk_size: int
    blocks_in_image: int
    blocks_allocated: int
    uuid_image: uuid.UUID
    uuid_last_snap: uuid.UUID
    uuid_link: uuid.UUID = _NIL
    uuid_parent: uuid.UUID = _NIL
    version: int = VDI_VERSION_1_1
    header_size: int = HEADER_SIZE_V1_1
    image_flags: int = 0
    description: bytes = b""
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    sector_size: int = SECTOR_SIZE
    unused1: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    block_extra: int = 0

    @property
    def is_static(self) -> bool:
        return self.image_type == VDI_TYPE_STATIC

    @property
    def virtual_size(self) -> int:
        """The disk size rounded up to whole sectors, as QEMU opens it.

        ``VBoxManage convertfromraw`` can write sizes that are not a multiple of 512.
        """
        return -(-self.disk_size // SECTOR_SIZE) * SECTOR_SIZE

    @property
    def bmap_size(self) -> int:
        """Bytes of block map that hold entries (without sector padding)."""
        return self.blocks_in_image * 4

    def replace(self, **changes: Any) -> VdiHeader:
        """A copy with some fields changed (for writers)."""
        return dataclasses.replace(self, **changes)


def _corrupt(message: str, field: str) -> CorruptImage:
    return CorruptImage(message, structure="header", field=field, offset=_AT.get(field))


def _unsupported(message: str, field: str) -> UnsupportedFeature:
    return UnsupportedFeature(message, structure="header", field=field, offset=_AT.get(field))


def decode_header(data: bytes | bytearray | memoryview) -> VdiHeader:
    """Decode the pre-header and version 1.1 header from the first sector of a VDI file.

    Values are not judged (see :func:`header_problems`), except that a version other
    than 1.1 leaves the rest undecoded (its layout is unknown): the fields keep their
    defaults.  Raises :class:`TruncatedImage` (fewer than 512 bytes) or
    :class:`FormatError` (bad signature).
    """
    data = bytes(data[:HEADER_AREA_SIZE])
    if len(data) < PRE_HEADER_SIZE:
        raise TruncatedImage("VDI pre-header is truncated", structure="pre-header", offset=0)
    pre = PRE_HEADER.parse(data[:PRE_HEADER_SIZE])
    if pre.signature != VDI_SIGNATURE:
        raise FormatError(
            f"not a VDI image (bad signature {pre.signature:#010x})",
            structure="pre-header",
            field="signature",
            offset=_AT["signature"],
        )
    text = pre.text.split(b"\0", 1)[0]
    if pre.version != VDI_VERSION_1_1:
        return VdiHeader(text, 0, 0, 0, 0, 0, 0, _NIL, _NIL, version=pre.version)
    if len(data) < HEADER_AREA_SIZE:
        raise TruncatedImage("VDI header is truncated", structure="header", offset=PRE_HEADER_SIZE)
    h = HEADER_V1_1.parse(data[PRE_HEADER_SIZE : PRE_HEADER_SIZE + HEADER_SIZE_V1_1])
    return VdiHeader(
        text=text,
        version=pre.version,
        header_size=h.header_size,
        image_type=h.image_type,
        image_flags=h.image_flags,
        description=h.description.split(b"\0", 1)[0],
        offset_bmap=h.offset_bmap,
        offset_data=h.offset_data,
        cylinders=h.cylinders,
        heads=h.heads,
        sectors=h.sectors,
        sector_size=h.sector_size,
        unused1=h.unused1,
        disk_size=h.disk_size,
        block_size=h.block_size,
        block_extra=h.block_extra,
        blocks_in_image=h.blocks_in_image,
        blocks_allocated=h.blocks_allocated,
        uuid_image=uuid.UUID(bytes_le=h.uuid_image),
        uuid_last_snap=uuid.UUID(bytes_le=h.uuid_last_snap),
        uuid_link=uuid.UUID(bytes_le=h.uuid_link),
        uuid_parent=uuid.UUID(bytes_le=h.uuid_parent),
    )


def header_problems(h: VdiHeader, file_size: int | None = None) -> list[QcowlibError]:
    """Everything QEMU's ``vdi_open`` (``block/vdi.c``) refuses in a decoded header.

    With ``file_size``, the block map must also lie inside the file, so that a caller
    can read it without allocating more than the file holds.  Returns
    :class:`UnsupportedFeature` (a version other than 1.1, undo or differencing images,
    linked or parent UUIDs, a block size other than 1 MiB, a sector size other than
    512, block extra data, unaligned offsets), :class:`CorruptImage` (sizes and offsets
    that contradict each other or exceed :data:`VDI_BLOCKS_IN_IMAGE_MAX` /
    :data:`VDI_DISK_SIZE_MAX`) and :class:`TruncatedImage` (block map past the end of
    the file), in that order.
    """
    if h.version != VDI_VERSION_1_1:
        return [
            UnsupportedFeature(
                f"unsupported VDI version {h.version >> 16}.{h.version & 0xFFFF}",
                structure="pre-header",
                field="version",
                offset=_AT["version"],
            )
        ]
    found: list[QcowlibError] = []
    if not HEADER_SIZE_V1_1 <= h.header_size <= HEADER_AREA_SIZE - PRE_HEADER_SIZE:
        found.append(_corrupt(f"header_size {h.header_size:#x} is invalid", "header_size"))
    if h.image_type == VDI_TYPE_DIFF:
        found.append(_unsupported("differencing VDI images are not supported", "image_type"))
    elif h.image_type == VDI_TYPE_UNDO:
        found.append(_unsupported("undo VDI images are not supported", "image_type"))
    elif h.image_type not in (VDI_TYPE_DYNAMIC, VDI_TYPE_STATIC):
        found.append(_corrupt(f"unknown image type {h.image_type}", "image_type"))
    if h.sector_size != SECTOR_SIZE:
        found.append(
            _unsupported(f"sector size {h.sector_size} is not {SECTOR_SIZE}", "sector_size")
        )
    if h.block_size != DEFAULT_BLOCK_SIZE:
        found.append(
            _unsupported(f"block size {h.block_size} is not {DEFAULT_BLOCK_SIZE}", "block_size")
        )
    if h.block_extra != 0:
        found.append(_unsupported("blocks with extra data are not supported", "block_extra"))
    if h.offset_bmap % SECTOR_SIZE:
        found.append(
            _unsupported(f"block map offset {h.offset_bmap:#x} is unaligned", "offset_bmap")
        )
    if h.offset_data % SECTOR_SIZE:
        found.append(_unsupported(f"data offset {h.offset_data:#x} is unaligned", "offset_data"))
    if h.uuid_link != _NIL:
        found.append(
            _unsupported("linked VDI images (non-null uuid_link) are not supported", "uuid_link")
        )
    if h.uuid_parent != _NIL:
        found.append(
            _unsupported(
                "VDI images with a parent (non-null uuid_parent) are not supported", "uuid_parent"
            )
        )
    found += _size_problems(h, file_size)
    return found


def _size_problems(h: VdiHeader, file_size: int | None) -> list[QcowlibError]:
    if h.blocks_in_image > VDI_BLOCKS_IN_IMAGE_MAX:
        return [
            _corrupt(
                f"too many blocks ({h.blocks_in_image}, at most {VDI_BLOCKS_IN_IMAGE_MAX})",
                "blocks_in_image",
            )
        ]
    found: list[QcowlibError] = []
    if h.disk_size > VDI_DISK_SIZE_MAX:
        found.append(_corrupt(f"disk size {h.disk_size} is larger than VDI allows", "disk_size"))
    elif h.disk_size > h.blocks_in_image * h.block_size:
        found.append(
            _corrupt(
                f"disk size {h.disk_size} exceeds what {h.blocks_in_image} blocks hold",
                "disk_size",
            )
        )
    if h.blocks_allocated > h.blocks_in_image:
        found.append(_corrupt("more blocks allocated than the image has", "blocks_allocated"))
    if h.offset_bmap < PRE_HEADER_SIZE + h.header_size:
        found.append(_corrupt("block map overlaps the header", "offset_bmap"))
    if h.offset_data < h.offset_bmap + h.blocks_in_image * 4:
        found.append(_corrupt("data area overlaps the block map", "offset_data"))
    if file_size is not None and h.offset_bmap + h.blocks_in_image * 4 > file_size:
        found.append(
            TruncatedImage(
                f"block map ({h.blocks_in_image} entries at {h.offset_bmap:#x}) extends past "
                "the end of the file",
                structure="header",
                field="offset_bmap",
                offset=_AT["offset_bmap"],
            )
        )
    return found


def parse_header(data: bytes | bytearray | memoryview, file_size: int | None = None) -> VdiHeader:
    """Parse and check the first sector of a VDI file, as QEMU's ``vdi_open`` does.

    :func:`decode_header`, then the first of :func:`header_problems` is raised.
    """
    h = decode_header(data)
    problems = header_problems(h, file_size)
    if problems:
        raise problems[0]
    return h


def build_header(header: VdiHeader) -> bytes:
    """The 512-byte header sector (pre-header, header, zero padding) for ``header``.

    Raises :class:`CorruptImage` when a value does not fit its field (a writer bug).
    """
    h = header
    if len(h.text) > _TEXT_SIZE or len(h.description) > _DESCRIPTION_SIZE:
        raise _corrupt("text or description is too long", "text")
    try:
        pre = PRE_HEADER.build(
            {
                "text": h.text.ljust(_TEXT_SIZE, b"\0"),
                "signature": VDI_SIGNATURE,
                "version": h.version,
            }
        )
        body = HEADER_V1_1.build(
            {
                "header_size": h.header_size,
                "image_type": h.image_type,
                "image_flags": h.image_flags,
                "description": h.description.ljust(_DESCRIPTION_SIZE, b"\0"),
                "offset_bmap": h.offset_bmap,
                "offset_data": h.offset_data,
                "cylinders": h.cylinders,
                "heads": h.heads,
                "sectors": h.sectors,
                "sector_size": h.sector_size,
                "unused1": h.unused1,
                "disk_size": h.disk_size,
                "block_size": h.block_size,
                "block_extra": h.block_extra,
                "blocks_in_image": h.blocks_in_image,
                "blocks_allocated": h.blocks_allocated,
                "uuid_image": h.uuid_image.bytes_le,
                "uuid_last_snap": h.uuid_last_snap.bytes_le,
                "uuid_link": h.uuid_link.bytes_le,
                "uuid_parent": h.uuid_parent.bytes_le,
            }
        )
    except cs.ConstructError as exc:
        raise CorruptImage(f"cannot build VDI header: {exc}", structure="header") from None
    out: bytes = pre + body
    return out.ljust(HEADER_AREA_SIZE, b"\0")


def block_map_extent(header: VdiHeader) -> tuple[int, int]:
    """``(offset, length)`` of the block map entries in the file."""
    return header.offset_bmap, header.bmap_size


def decode_block_map(
    raw: bytes | bytearray | memoryview, header: VdiHeader, file_size: int | None = None
) -> U32:
    """The block map as a native ``uint32`` array (a copy), validated.

    ``raw`` holds the :func:`block_map_extent` bytes.  Every entry must be
    :data:`VDI_UNALLOCATED`, :data:`VDI_DISCARDED` or a block index below
    ``blocks_in_image``; with ``file_size``, the guest-visible part of every allocated
    block must lie inside the file.  Raises :class:`TruncatedImage` or
    :class:`CorruptImage` naming the first bad entry and its file offset.
    """
    import numpy as np

    n = header.blocks_in_image
    if len(raw) < n * 4:
        raise TruncatedImage(
            "block map is truncated", structure="block map", offset=header.offset_bmap
        )
    bmap = np.frombuffer(raw, dtype=np.dtype("<u4"), count=n).astype(np.uint32)
    allocated = bmap < np.uint32(VDI_DISCARDED)
    bad = np.flatnonzero(allocated & (bmap >= np.uint32(n)))
    if bad.size:
        i = int(bad[0])
        raise CorruptImage(
            f"block map entry {i} points to block {int(bmap[i])}, past the {n} blocks of the image",
            structure="block map",
            field=f"entry[{i}]",
            offset=header.offset_bmap + 4 * i,
        )
    if file_size is not None and n:
        # A block whose guest-visible bytes end past the file cannot be read.
        bs = header.block_size
        guest_len = np.clip(header.virtual_size - np.arange(n, dtype=np.int64) * bs, 0, bs)
        ends = header.offset_data + bmap.astype(np.int64) * bs + guest_len
        bad = np.flatnonzero(allocated & (guest_len > 0) & (ends > file_size))
        if bad.size:
            i = int(bad[0])
            raise TruncatedImage(
                f"block {int(bmap[i])} (block map entry {i}) lies past the end of the file",
                structure="block map",
                field=f"entry[{i}]",
                offset=header.offset_bmap + 4 * i,
            )
    return bmap


def encode_block_map(bmap: U32, padded_to: int = SECTOR_SIZE) -> bytes:
    """Native ``uint32`` entries to little-endian bytes, zero-padded to ``padded_to``."""
    import numpy as np

    raw = np.asarray(bmap, dtype=np.uint32).astype(np.dtype("<u4")).tobytes()
    pad = -len(raw) % padded_to
    return raw + bytes(pad)


@dataclass(frozen=True)
class VdiLayout:
    """Where a new image's parts go, as QEMU's ``vdi_co_do_create`` places them."""

    blocks_in_image: int
    offset_bmap: int
    offset_data: int

    @property
    def bmap_area(self) -> int:
        """Bytes between the block map and the data (the map padded to a sector)."""
        return self.offset_data - self.offset_bmap


def plan_layout(disk_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> VdiLayout:
    """Layout of a new image: header sector, block map padded to a sector, then data.

    Raises :class:`UnsupportedFeature` for sizes above :data:`VDI_DISK_SIZE_MAX`.
    """
    if disk_size < 0 or disk_size > VDI_DISK_SIZE_MAX:
        raise UnsupportedFeature(
            f"VDI images hold at most {VDI_DISK_SIZE_MAX} bytes, not {disk_size}",
            structure="header",
            field="disk_size",
        )
    blocks = -(-disk_size // block_size)
    bmap_bytes = -(-blocks * 4 // SECTOR_SIZE) * SECTOR_SIZE
    return VdiLayout(blocks, HEADER_AREA_SIZE, HEADER_AREA_SIZE + bmap_bytes)


def new_header(
    disk_size: int,
    *,
    static: bool,
    blocks_allocated: int,
    uuid_image: uuid.UUID | None = None,
    uuid_last_snap: uuid.UUID | None = None,
) -> VdiHeader:
    """The header of a new image of ``disk_size`` bytes, fresh UUIDs unless given."""
    lay = plan_layout(disk_size)
    return VdiHeader(
        text=VDI_TEXT,
        image_type=VDI_TYPE_STATIC if static else VDI_TYPE_DYNAMIC,
        offset_bmap=lay.offset_bmap,
        offset_data=lay.offset_data,
        disk_size=disk_size,
        blocks_in_image=lay.blocks_in_image,
        blocks_allocated=blocks_allocated,
        uuid_image=uuid_image or uuid.uuid4(),
        uuid_last_snap=uuid_last_snap or uuid.uuid4(),
    )
