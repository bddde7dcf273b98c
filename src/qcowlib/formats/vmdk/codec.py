"""VMware VMDK: hosted sparse extent header, grain directory and tables, stream markers,
and the text descriptor.

Pure: functions here turn bytes into values and values into bytes.  Nothing opens a
file; callers read the ranges named by :class:`SparseExtentHeader` and hand them over.

Layouts follow VMware's "Virtual Disk Format 5.0" (VDF) and QEMU ``block/vmdk.c``,
whose field names are used here::

    0x000  SparseExtentHeader (512 bytes, magic "KDMV", all integers little-endian):
           version, flags, capacity, grain_size, desc_offset, desc_size,
           num_gtes_per_gt, rgd_offset, gd_offset, grain_offset, unclean_shutdown,
           check_bytes ("\\n \\r\\n"), compress_algorithm, padding
           (sizes and offsets in 512-byte sectors)
    desc   the embedded text descriptor (monolithicSparse, streamOptimized)
    gd     grain directory: one uint32 per grain table, the table's sector (0: none)
    gt     grain tables of ``num_gtes_per_gt`` uint32 entries: the grain's sector,
           0 (unallocated) or 1 (zeroed grain, VDF "zeroed-grain GTE")

A stream-optimized extent (VDF section 4) stores each grain behind a *grain marker*
(``lba``, compressed ``size``, zlib data, padded to a sector); metadata follows
*markers* (``num_sectors``, ``size`` 0, ``type``: EOS, GT, GD, FOOTER).  When the header's
``gd_offset`` is :data:`GD_AT_END`, the last three sectors of the file hold a footer
marker, a copy of the header with the real ``gd_offset``, and an end-of-stream marker.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
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
    # numpy is imported where tables are decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    U32 = npt.NDArray[np.uint32]
    I64 = npt.NDArray[np.int64]

__all__ = [
    "CHECK_BYTES",
    "COMPRESSION_DEFLATE",
    "COMPRESSION_NONE",
    "DEFAULT_GRAIN_SIZE",
    "DEFAULT_NUM_GTES_PER_GT",
    "DESCRIPTOR_TYPES",
    "DESC_SECTORS",
    "GD_AT_END",
    "GRAIN_MARKER_HEAD_SIZE",
    "GTE_ZEROED",
    "MARKER_EOS",
    "MARKER_FOOTER",
    "MARKER_GD",
    "MARKER_GT",
    "SECTOR",
    "U32",
    "VMDK3_MAGIC",
    "VMDK4_FLAG_COMPRESS",
    "VMDK4_FLAG_MARKER",
    "VMDK4_FLAG_NL_DETECT",
    "VMDK4_FLAG_RGD",
    "VMDK4_FLAG_ZERO_GRAIN",
    "VMDK4_MAGIC",
    "VMDK_DESC_MAX",
    "VMDK_DESC_SECTOR",
    "VMDK_GRAIN_SIZE_MAX",
    "VMDK_MAX_EXTENTS",
    "Marker",
    "SparseExtentHeader",
    "VmdkDescriptor",
    "VmdkExtent",
    "build_descriptor",
    "build_grain_marker",
    "build_header",
    "build_marker",
    "check_descriptor",
    "check_grain_tables",
    "compress_grain",
    "decode_header",
    "decode_table",
    "decompress_grain",
    "descriptor_problems",
    "encode_table",
    "grain_directory_extent",
    "grain_table_offsets",
    "header_problems",
    "parse_descriptor",
    "parse_grain_marker",
    "parse_header",
    "parse_marker",
    "parse_stream_footer",
    "stream_footer_header",
]

SECTOR: Final = 512
VMDK4_MAGIC: Final = b"KDMV"
VMDK3_MAGIC: Final = b"COWD"
#: Header flags (QEMU's VMDK4_FLAG_*; VDF 2.2 "flags").
VMDK4_FLAG_NL_DETECT: Final = 1 << 0
VMDK4_FLAG_RGD: Final = 1 << 1
VMDK4_FLAG_ZERO_GRAIN: Final = 1 << 2
VMDK4_FLAG_COMPRESS: Final = 1 << 16
VMDK4_FLAG_MARKER: Final = 1 << 17
COMPRESSION_NONE: Final = 0
#: VDF says RFC 1951, but VMware and QEMU write zlib (RFC 1950) streams.
COMPRESSION_DEFLATE: Final = 1
GD_AT_END: Final = 0xFFFFFFFFFFFFFFFF
#: A grain table entry of a zeroed grain (VDF: "zeroed-grain GTE").
GTE_ZEROED: Final = 1
#: Marker types (VDF 4.4).
MARKER_EOS: Final = 0
MARKER_GT: Final = 1
MARKER_GD: Final = 2
MARKER_FOOTER: Final = 3
#: The newline detection bytes every writer puts in ``check_bytes``.
CHECK_BYTES: Final = b"\n \r\n"
#: What QEMU and VMware write: 64 KiB grains, 512 entries per grain table.
DEFAULT_GRAIN_SIZE: Final = 128
DEFAULT_NUM_GTES_PER_GT: Final = 512
#: The embedded descriptor: sector 1, 20 sectors, as QEMU writes it.
VMDK_DESC_SECTOR: Final = 1
DESC_SECTORS: Final = 20
#: QEMU's vmdk_read_desc and the image inspector both cap a descriptor at 1 MiB - 1.
VMDK_DESC_MAX: Final = (1 << 20) - 1
#: Grains above 32 MiB (65536 sectors) are refused: every reader decompresses a whole
#: grain into memory, and no writer uses more than 64 KiB.
VMDK_GRAIN_SIZE_MAX: Final = 1 << 16
#: QEMU refuses grain tables of more than 512 entries ("L2 table size too big").
VMDK_NUM_GTES_MAX: Final = 512
#: Largest capacity in sectors whose byte size still fits a signed 64-bit offset.
VMDK_CAPACITY_MAX: Final = (1 << 63) // SECTOR - 1
#: Extents taken from one descriptor; QEMU refuses far fewer in practice.
VMDK_MAX_EXTENTS: Final = 4096
#: A grain marker's head: ``lba`` (uint64) and ``size`` (uint32).
GRAIN_MARKER_HEAD_SIZE: Final = 12

#: SparseExtentHeader (VDF 2.2), QEMU's VMDK4Header names, with the magic and padding.
HEADER = cs.Struct(
    "magic" / cs.Bytes(4),
    "version" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "capacity" / cs.Int64ul,
    "grain_size" / cs.Int64ul,
    "desc_offset" / cs.Int64ul,
    "desc_size" / cs.Int64ul,
    "num_gtes_per_gt" / cs.Int32ul,
    "rgd_offset" / cs.Int64ul,
    "gd_offset" / cs.Int64ul,
    "grain_offset" / cs.Int64ul,
    "filler" / cs.Int8ul,
    "check_bytes" / cs.Bytes(4),
    "compress_algorithm" / cs.Int16ul,
)
HEADER_SIZE: Final = HEADER.sizeof()
#: Metadata marker (VDF 4.4 MetaDataMarker): a whole sector.
MARKER = cs.Struct(
    "val" / cs.Int64ul, "size" / cs.Int32ul, "type" / cs.Int32ul, "pad" / cs.Bytes(496)
)
GRAIN_MARKER_HEAD = cs.Struct("lba" / cs.Int64ul, "size" / cs.Int32ul)
assert HEADER_SIZE == 79
assert MARKER.sizeof() == SECTOR
assert GRAIN_MARKER_HEAD.sizeof() == GRAIN_MARKER_HEAD_SIZE

#: File offsets of the header fields named in errors.
_AT: Final[dict[str, int]] = {
    "magic": 0,
    "version": 4,
    "flags": 8,
    "capacity": 12,
    "grain_size": 20,
    "desc_offset": 28,
    "desc_size": 36,
    "num_gtes_per_gt": 44,
    "rgd_offset": 48,
    "gd_offset": 56,
    "grain_offset": 64,
    "compress_algorithm": 77,
}


@dataclass(frozen=True)
class SparseExtentHeader:
    """A hosted sparse extent header (``SparseExtentHeader``, magic ``KDMV``).

    Sizes and offsets are in sectors, as stored.
    """

    version: int
    flags: int
    capacity: int
    grain_size: int
    desc_offset: int
    desc_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    compress_algorithm: int
    unclean_shutdown: int = 0
    check_bytes: bytes = CHECK_BYTES

    @property
    def descriptor_range(self) -> tuple[int, int]:
        """``(offset, length)`` in bytes of the embedded descriptor, capped at 1 MiB."""
        return self.desc_offset * SECTOR, min(self.desc_size * SECTOR, VMDK_DESC_MAX)

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def has_markers(self) -> bool:
        return bool(self.flags & VMDK4_FLAG_MARKER)

    @property
    def has_zero_grain(self) -> bool:
        return bool(self.flags & VMDK4_FLAG_ZERO_GRAIN)

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def num_grains(self) -> int:
        """Grains covering ``capacity`` (the last one may be partly past it)."""
        return -(-self.capacity // self.grain_size) if self.grain_size else 0

    @property
    def num_gd_entries(self) -> int:
        """Grain directory entries (QEMU's ``l1_size``)."""
        per = self.num_gtes_per_gt * self.grain_size
        return -(-self.capacity // per) if per else 0

    @property
    def gt_bytes(self) -> int:
        return self.num_gtes_per_gt * 4

    def replace(self, **changes: Any) -> SparseExtentHeader:
        """A copy with some fields changed (for writers)."""
        return dataclasses.replace(self, **changes)


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> SparseExtentHeader:
    """Decode a ``KDMV`` header (at least 79 bytes) without judging its values.

    ``offset`` is where ``data`` sits in the file (for errors).  Raises
    :class:`TruncatedImage` or :class:`FormatError` (bad magic).  :func:`parse_header`
    also checks the values.
    """
    h = _parse(HEADER, data, "vmdk header", offset)
    if h.magic != VMDK4_MAGIC:
        raise FormatError(
            "not a VMDK sparse extent (bad magic)",
            structure="vmdk header",
            field="magic",
            offset=offset,
        )
    return SparseExtentHeader(
        version=h.version,
        flags=h.flags,
        capacity=h.capacity,
        grain_size=h.grain_size,
        desc_offset=h.desc_offset,
        desc_size=h.desc_size,
        num_gtes_per_gt=h.num_gtes_per_gt,
        rgd_offset=h.rgd_offset,
        gd_offset=h.gd_offset,
        grain_offset=h.grain_offset,
        compress_algorithm=h.compress_algorithm,
        unclean_shutdown=h.filler,
        check_bytes=h.check_bytes,
    )


def _bad(
    cls: type[FormatError] | type[UnsupportedFeature], message: str, field: str, base: int
) -> FormatError | UnsupportedFeature:
    return cls(message, structure="vmdk header", field=field, offset=base + _AT[field])


def header_problems(
    h: SparseExtentHeader,
    file_size: int | None = None,
    *,
    offset: int = 0,
    footer: bool = False,
) -> list[QcowlibError]:
    """Everything :func:`parse_header` refuses in a decoded header, in order.

    See :func:`parse_header` for the checks, ``file_size`` and ``footer``.
    """
    found: list[QcowlibError] = []
    if h.version == 0 or h.version > 3:
        found.append(
            _bad(UnsupportedFeature, f"unsupported VMDK version {h.version}", "version", offset)
        )
    if h.compress_algorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
        found.append(
            _bad(
                UnsupportedFeature,
                f"unknown compression algorithm {h.compress_algorithm}",
                "compress_algorithm",
                offset,
            )
        )
    elif h.compressed and not h.has_markers:
        found.append(
            _bad(
                UnsupportedFeature,
                "compressed grains without grain markers are not supported",
                "flags",
                offset,
            )
        )
    if not 1 <= h.num_gtes_per_gt <= VMDK_NUM_GTES_MAX:
        found.append(
            _bad(
                CorruptImage,
                f"grain table size {h.num_gtes_per_gt} is outside 1..{VMDK_NUM_GTES_MAX}",
                "num_gtes_per_gt",
                offset,
            )
        )
    gs = h.grain_size
    if gs == 0 or gs & (gs - 1) or gs > VMDK_GRAIN_SIZE_MAX:
        found.append(
            _bad(CorruptImage, f"grain size {gs} sectors is invalid", "grain_size", offset)
        )
    if h.capacity > VMDK_CAPACITY_MAX:
        found.append(
            _bad(CorruptImage, f"capacity {h.capacity} sectors is too large", "capacity", offset)
        )
    if footer and h.gd_offset == GD_AT_END:
        found.append(
            _bad(CorruptImage, "the footer points to yet another footer", "gd_offset", offset)
        )
    if file_size is not None:
        found += _placement_problems(h, file_size, offset)
    return found


def _placement_problems(h: SparseExtentHeader, file_size: int, offset: int) -> list[QcowlibError]:
    """The descriptor, grain directory and first grain lie inside the file."""
    found: list[QcowlibError] = []
    if h.grain_offset * SECTOR > file_size:
        found.append(
            _bad(
                TruncatedImage,
                f"file is truncated: grain_offset {h.grain_offset} is past its end",
                "grain_offset",
                offset,
            )
        )
    if h.desc_offset and (h.desc_offset * SECTOR >= file_size or h.desc_size == 0):
        found.append(
            _bad(
                CorruptImage,
                "embedded descriptor lies past the end of the file",
                "desc_offset",
                offset,
            )
        )
    if h.gd_offset != GD_AT_END:
        start, length = grain_directory_extent(h)
        if start + length > file_size:
            found.append(
                _bad(
                    TruncatedImage,
                    f"grain directory ({h.num_gd_entries} entries at {start:#x}) extends "
                    "past the end of the file",
                    "gd_offset",
                    offset,
                )
            )
    return found


def parse_header(
    data: bytes | bytearray | memoryview,
    file_size: int | None = None,
    *,
    offset: int = 0,
    footer: bool = False,
) -> SparseExtentHeader:
    """Parse and check a ``KDMV`` header, as QEMU's ``vmdk_open_vmdk4`` does and more.

    With ``file_size``, the grain directory, the embedded descriptor and ``grain_offset``
    must lie inside the file, so callers can read them without allocating more than the
    file holds.  ``footer`` marks the footer copy of a stream (its ``gd_offset`` must be
    real).  Raises :class:`TruncatedImage`, :class:`FormatError` (bad magic),
    :class:`UnsupportedFeature` (version above 3, compression other than deflate,
    compressed grains without markers) or :class:`CorruptImage` (grain size, table size
    or capacity out of range: :data:`VMDK_GRAIN_SIZE_MAX`, :data:`VMDK_NUM_GTES_MAX`,
    :data:`VMDK_CAPACITY_MAX`): the first of :func:`header_problems`.
    """
    h = decode_header(data, offset)
    problems = header_problems(h, file_size, offset=offset, footer=footer)
    if problems:
        raise problems[0]
    return h


def build_header(header: SparseExtentHeader) -> bytes:
    """The 512-byte header sector for ``header`` (magic, fields, zero padding).

    Raises :class:`CorruptImage` when a value does not fit its field (a writer bug).
    """
    h = header
    try:
        raw = HEADER.build(
            {
                "magic": VMDK4_MAGIC,
                "version": h.version,
                "flags": h.flags,
                "capacity": h.capacity,
                "grain_size": h.grain_size,
                "desc_offset": h.desc_offset,
                "desc_size": h.desc_size,
                "num_gtes_per_gt": h.num_gtes_per_gt,
                "rgd_offset": h.rgd_offset,
                "gd_offset": h.gd_offset,
                "grain_offset": h.grain_offset,
                "filler": h.unclean_shutdown,
                "check_bytes": h.check_bytes,
                "compress_algorithm": h.compress_algorithm,
            }
        )
    except cs.ConstructError as exc:
        raise CorruptImage(f"cannot build VMDK header: {exc}", structure="vmdk header") from None
    out: bytes = raw
    return out.ljust(SECTOR, b"\0")


# ---------------------------------------------------------------------------------------
# grain directory and grain tables


def grain_directory_extent(header: SparseExtentHeader) -> tuple[int, int]:
    """``(offset, length)`` in bytes of the grain directory entries."""
    return header.gd_offset * SECTOR, header.num_gd_entries * 4


def decode_table(
    raw: bytes | bytearray | memoryview, count: int, *, what: str = "grain table", offset: int = 0
) -> U32:
    """``count`` little-endian uint32 entries as a native ``uint32`` array (a copy).

    Raises :class:`TruncatedImage` when ``raw`` is shorter.
    """
    import numpy as np

    if count < 0 or len(raw) < count * 4:
        raise TruncatedImage(f"{what} is truncated", structure=what, offset=offset)
    return np.frombuffer(raw, dtype=np.dtype("<u4"), count=count).astype(np.uint32)


def encode_table(entries: U32, padded_to: int = SECTOR) -> bytes:
    """Native ``uint32`` entries to little-endian bytes, zero-padded to ``padded_to``."""
    import numpy as np

    raw = np.asarray(entries, dtype=np.uint32).astype(np.dtype("<u4")).tobytes()
    return raw + bytes(-len(raw) % padded_to)


def grain_table_offsets(gd: U32, h: SparseExtentHeader, file_size: int, gd_offset: int) -> I64:
    """File offsets of the grain tables the directory ``gd`` names, in directory order.

    Real grain tables are distinct and inside the file: more of them than the file can
    hold means a crafted directory, refused (:class:`CorruptImage`) before anything is
    read or allocated for them; a table past the end of the file is a
    :class:`TruncatedImage` naming its directory entry.
    """
    import numpy as np

    gt_bytes = h.gt_bytes
    allocated = np.flatnonzero(gd)
    if allocated.size * gt_bytes > file_size:
        raise CorruptImage(
            f"{allocated.size} grain tables cannot fit a file of {file_size} bytes",
            structure="vmdk grain directory",
            offset=gd_offset,
        )
    offsets = gd[allocated].astype(np.int64) * SECTOR
    bad = np.flatnonzero(offsets + gt_bytes > file_size)
    if bad.size:
        i = int(allocated[int(bad[0])])
        raise TruncatedImage(
            f"grain table {i} lies past the end of the file",
            structure="vmdk grain directory",
            field=f"entry[{i}]",
            offset=gd_offset + 4 * i,
        )
    return offsets


def check_grain_tables(gd: U32, tables: U32, h: SparseExtentHeader, file_size: int) -> None:
    """Refuse a grain inside the capacity whose grain table entry points past the file.

    ``tables`` holds the entries of the grain tables :func:`grain_table_offsets` names,
    in directory order.  Raises :class:`TruncatedImage` naming the first such grain.
    """
    import numpy as np

    gtes = h.num_gtes_per_gt
    first = np.flatnonzero(gd).astype(np.int64) * gtes
    grain = (first[:, None] + np.arange(gtes, dtype=np.int64)).ravel()
    value = tables[: grain.size].astype(np.int64)
    past = (value > GTE_ZEROED) & (grain < h.num_grains) & (value * SECTOR >= file_size)
    bad = np.flatnonzero(past)
    if bad.size:
        i = int(bad[0])
        g = int(grain[i])
        raise TruncatedImage(
            f"grain {g} (sector {int(value[i])}) lies past the end of the file",
            structure="vmdk grain table",
            field=f"entry[{g}]",
        )


# ---------------------------------------------------------------------------------------
# stream markers


@dataclass(frozen=True)
class Marker:
    """A metadata marker (VDF 4.4): ``val`` is the sectors of metadata that follow."""

    val: int
    size: int
    type: int
    pad: bytes = bytes(496)


def parse_marker(data: bytes | bytearray | memoryview, offset: int = 0) -> Marker:
    """A metadata marker from a sector.  Raises :class:`TruncatedImage`."""
    m = _parse(MARKER, data, "vmdk marker", offset)
    return Marker(m.val, m.size, m.type, m.pad)


def build_marker(marker_type: int, num_sectors: int = 0) -> bytes:
    """A metadata marker sector of ``marker_type`` announcing ``num_sectors``."""
    out: bytes = MARKER.build(
        {"val": num_sectors, "size": 0, "type": marker_type, "pad": bytes(496)}
    )
    return out


def parse_grain_marker(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """``(lba, size)`` of a grain marker head (12 bytes).  Raises :class:`TruncatedImage`."""
    m = _parse(GRAIN_MARKER_HEAD, data, "vmdk grain marker", offset)
    return int(m.lba), int(m.size)


def build_grain_marker(lba: int, payload: bytes) -> bytes:
    """A grain marker with its compressed ``payload``, zero-padded to whole sectors."""
    out: bytes = GRAIN_MARKER_HEAD.build({"lba": lba, "size": len(payload)}) + payload
    return out + bytes(-len(out) % SECTOR)


def parse_stream_footer(
    tail: bytes | bytearray | memoryview,
) -> tuple[Marker, SparseExtentHeader, Marker]:
    """The last 1536 bytes of a stream: footer marker, footer header, EOS marker.

    Decoded without judging values.  Raises :class:`TruncatedImage` when fewer bytes
    are given and :class:`FormatError` when the footer has a bad magic.
    """
    if len(tail) < 3 * SECTOR:
        raise TruncatedImage("VMDK stream footer is truncated", structure="vmdk footer")
    tail = tail[-3 * SECTOR :]
    marker = parse_marker(tail[:SECTOR])
    footer = decode_header(tail[SECTOR : 2 * SECTOR])
    eos = parse_marker(tail[2 * SECTOR :])
    return marker, footer, eos


def stream_footer_header(
    tail: bytes | bytearray | memoryview, file_size: int
) -> SparseExtentHeader:
    """The checked footer header from the last 1536 bytes of a ``file_size``-byte file.

    Checks what QEMU's ``vmdk_open_vmdk4`` checks (footer marker, magic, EOS marker) and
    then the header itself (:func:`parse_header`).  Raises :class:`TruncatedImage` or
    :class:`CorruptImage` with the file offset of the bad part.
    """
    base = file_size - 3 * SECTOR
    if base < 0 or len(tail) < 3 * SECTOR:
        raise TruncatedImage(
            "VMDK stream footer is missing (file too short)", structure="vmdk footer", offset=0
        )
    marker, _, eos = parse_stream_footer(tail)
    if marker.size != 0 or marker.type != MARKER_FOOTER:
        raise CorruptImage(
            "VMDK footer marker is invalid (truncated stream?)",
            structure="vmdk footer marker",
            offset=base,
        )
    if eos.val != 0 or eos.size != 0 or eos.type != MARKER_EOS:
        raise CorruptImage(
            "VMDK end-of-stream marker is invalid (truncated stream?)",
            structure="vmdk end-of-stream marker",
            offset=base + 2 * SECTOR,
        )
    return parse_header(tail[-2 * SECTOR :], file_size, offset=base + SECTOR, footer=True)


# ---------------------------------------------------------------------------------------
# compressed grains


def decompress_grain(data: bytes | memoryview, grain_bytes: int, *, offset: int = 0) -> bytes:
    """Inflate one grain (a zlib stream); never produces more than ``grain_bytes``.

    A stream shorter than a grain is zero-padded (the last grain of a disk whose size is
    not a whole number of grains may be written short).  Raises :class:`CorruptImage`.
    """
    try:
        d = zlib.decompressobj()
        out = d.decompress(data, grain_bytes)
    except zlib.error as exc:
        raise CorruptImage(
            f"invalid compressed grain: {exc}", structure="vmdk grain", offset=offset
        ) from None
    if len(out) < grain_bytes:
        out += bytes(grain_bytes - len(out))
    return out


def compress_grain(data: bytes | memoryview, level: int = zlib.Z_DEFAULT_COMPRESSION) -> bytes:
    """Deflate one grain into a zlib stream, as VMware and QEMU write it."""
    return zlib.compress(data, level)


# ---------------------------------------------------------------------------------------
# text descriptor


@dataclass(frozen=True)
class VmdkExtent:
    """One extent line: ``ACCESS SECTORS TYPE ["FILENAME" [OFFSET]]`` (VDF 3.2)."""

    access: str
    sectors: int | None
    type: str
    filename: str | None
    line: int
    #: FLAT extents: where the extent's data starts in its file, in sectors.
    offset: int | None = None


@dataclass(frozen=True)
class VmdkDescriptor:
    """What a VMDK text descriptor declares, as QEMU and the image inspector read it."""

    fields: tuple[tuple[str, str], ...]
    extents: tuple[VmdkExtent, ...]
    #: Lines the image inspector refuses ("Invalid VMDK descriptor data"), with numbers.
    unsupported_lines: tuple[tuple[int, str], ...]
    #: Extent lines containing ``/`` (the inspector refuses them: they can name any path).
    slash_extent_lines: tuple[tuple[int, str], ...]
    #: The disk database: ``ddb.*`` entries (names without quotes, values unquoted).
    ddb: tuple[tuple[str, str], ...] = ()

    def field(self, name: str) -> str | None:
        """A header field's value, name matched case-insensitively (last one wins)."""
        value = None
        for key, val in self.fields:
            if key.lower() == name.lower():
                value = val
        return value

    def ddb_value(self, name: str) -> str | None:
        """A disk database value (``name`` with or without ``ddb.``; last one wins)."""
        if not name.lower().startswith("ddb."):
            name = "ddb." + name
        value = None
        for key, val in self.ddb:
            if key.lower() == name.lower():
                value = val
        return value

    @property
    def create_type(self) -> str | None:
        return self.field("createType")

    @property
    def parent_file_name_hint(self) -> str | None:
        return self.field("parentFileNameHint")

    @property
    def cid(self) -> int | None:
        return _hex32(self.field("CID"))

    @property
    def parent_cid(self) -> int | None:
        return _hex32(self.field("parentCID"))

    @property
    def adapter_type(self) -> str | None:
        return self.ddb_value("adapterType")

    @property
    def virtual_hw_version(self) -> str | None:
        return self.ddb_value("virtualHWVersion")


def _hex32(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value, 16)
    except ValueError:
        return None
    return n if 0 <= n <= 0xFFFFFFFF else None


_EXTENT_ACCESS: Final = ("rw", "rdonly", "noaccess")
_EXTENT_RE = re.compile(
    r"^(?P<access>\S+)\s+(?P<sectors>\S+)\s+(?P<type>\S+)"
    r'(?:\s+"(?P<name>[^"\r\n]*)"(?:\s+(?P<off>\S+))?)?'
)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_descriptor(raw: bytes | bytearray | memoryview) -> VmdkDescriptor:
    """Parse a text descriptor (embedded or stand-alone), at most 1 MiB of it (VDF 3).

    The text ends at the first NUL byte (embedded descriptors are NUL padded).  Lines
    are kept as found; :mod:`qcowlib.formats.vmdk.reader` decides what it opens.  Raises
    :class:`CorruptImage` when the text is not ASCII, as the image inspector refuses it.
    """
    data = bytes(raw[:VMDK_DESC_MAX]).split(b"\0", 1)[0]
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise CorruptImage(
            "VMDK descriptor is not ASCII text", structure="vmdk descriptor", offset=exc.start
        ) from None
    fields: list[tuple[str, str]] = []
    extents: list[VmdkExtent] = []
    unsupported: list[tuple[int, str]] = []
    slash: list[tuple[int, str]] = []
    ddb: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lower = line.lower()
        first_word = lower.split(" ")[0]
        if lower.startswith("ddb"):
            key, eq, value = line.partition("=")
            if eq and len(ddb) < VMDK_MAX_EXTENTS:
                ddb.append((_unquote(key), _unquote(value)))
            continue
        if "=" in line and " " not in line.split("=")[0]:
            key, _, value = line.partition("=")
            fields.append((key.strip(), _unquote(value)))
            continue
        if first_word in _EXTENT_ACCESS:
            if "/" in line:
                slash.append((number, line))
            if len(extents) < VMDK_MAX_EXTENTS:
                extents.append(_extent(line, number))
            continue
        # QEMU also reads "key = value" with spaces; the inspector refuses such lines.
        if "=" in line and " " not in line.split("=")[0].strip():
            key, _, value = line.partition("=")
            fields.append((key.strip(), _unquote(value)))
        unsupported.append((number, line))
    return VmdkDescriptor(
        tuple(fields), tuple(extents), tuple(unsupported), tuple(slash), tuple(ddb)
    )


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _extent(line: str, number: int) -> VmdkExtent:
    match = _EXTENT_RE.match(line)
    if match is None:
        return VmdkExtent(line.split(maxsplit=1)[0].upper(), None, "", None, number)
    return VmdkExtent(
        match.group("access").upper(),
        _int_or_none(match.group("sectors")),
        match.group("type").upper(),
        match.group("name"),
        number,
        _int_or_none(match.group("off")),
    )


#: createType values a stand-alone descriptor may have (QEMU's list, less VMFS).
DESCRIPTOR_TYPES: Final = ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
_DESCRIPTOR_ACCESS: Final = ("RW", "RDONLY")


def descriptor_problems(desc: VmdkDescriptor) -> list[QcowlibError]:
    """What QEMU's ``vmdk_open_desc_file`` and ``vmdk_parse_extents`` refuse, in order.

    For a descriptor read as the disk (a stand-alone descriptor, or the embedded one of
    a sparse extent of capacity 0): :class:`FormatError` without a createType,
    :class:`UnsupportedFeature` for another createType, too many extents or an extent
    type other than FLAT, SPARSE and ZERO, :class:`CorruptImage` for no extents, a bad
    extent line (access, size, missing file name or FLAT offset) or a disk too large.
    The extent files themselves are the caller's to open and check.
    """
    what = "vmdk descriptor"
    found: list[QcowlibError] = []
    ct = desc.create_type
    if ct is None:
        found.append(FormatError("VMDK descriptor has no createType", structure=what))
    elif ct not in DESCRIPTOR_TYPES:
        found.append(
            UnsupportedFeature(
                f"VMDK createType {ct!r} is not supported", structure=what, field="createType"
            )
        )
    if not desc.extents:
        found.append(CorruptImage("VMDK descriptor names no extents", structure=what))
    if len(desc.extents) >= VMDK_MAX_EXTENTS:
        found.append(
            UnsupportedFeature(f"more than {VMDK_MAX_EXTENTS - 1} extents", structure=what)
        )
    sectors = 0
    for ext in desc.extents:
        where = f"extent line {ext.line}"
        if ext.access not in _DESCRIPTOR_ACCESS or ext.sectors is None or ext.sectors <= 0:
            found.append(CorruptImage(f"invalid {where}", structure=what, field=where))
            continue
        sectors += ext.sectors
        if sectors > VMDK_CAPACITY_MAX:
            found.append(CorruptImage(f"{where}: disk too large", structure=what, field=where))
        if ext.type == "ZERO":
            continue
        if ext.type not in ("FLAT", "SPARSE"):
            found.append(
                UnsupportedFeature(
                    f"VMDK extent type {ext.type!r} is not supported", structure=what, field=where
                )
            )
        elif ext.filename is None:
            found.append(CorruptImage(f"{where} names no file", structure=what, field=where))
        elif ext.type == "FLAT" and (ext.offset is None or ext.offset < 0):
            found.append(
                CorruptImage(f"{where}: FLAT extent needs an offset", structure=what, field=where)
            )
    return found


def check_descriptor(desc: VmdkDescriptor) -> None:
    """Raise the first of :func:`descriptor_problems`."""
    problems = descriptor_problems(desc)
    if problems:
        raise problems[0]


def build_descriptor(
    *,
    create_type: str,
    extents: list[tuple[str, int, str, str | None, int | None]],
    cid: int,
    parent_cid: int = 0xFFFFFFFF,
    ddb: list[tuple[str, str]] | None = None,
) -> bytes:
    """A descriptor as QEMU writes it (VDF 3): header, extent lines, disk database.

    ``extents`` are ``(access, sectors, type, filename, offset)``; ``ddb`` entries are
    ``(name, value)`` with names starting ``ddb.`` (``ddb.adapterType``,
    ``ddb.virtualHWVersion``, ...).  Raises :class:`CorruptImage` for names or values
    that would not read back (quotes, newlines, non-ASCII).
    """
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{_safe(create_type)}"',
        "",
        "# Extent description",
    ]
    for access, sectors, etype, name, off in extents:
        line = f"{_safe(access)} {sectors} {_safe(etype)}"
        if name is not None:
            line += f' "{_safe(name)}"'
            if off is not None:
                line += f" {off}"
        lines.append(line)
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    for key, value in ddb or []:
        lines.append(f'{_safe(key)} = "{_safe(value)}"')
    return ("\n".join(lines) + "\n").encode("ascii")


def _safe(text: str) -> str:
    if not text.isascii() or any(c in text for c in '"\r\n\0'):
        raise CorruptImage(f"cannot put {text!r} in a VMDK descriptor", structure="vmdk descriptor")
    return text
