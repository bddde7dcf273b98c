"""Parallels expandable images: the header, the BAT and the Format Extension.

Pure: :func:`parse_header` checks a header as QEMU's ``parallels_open``
(``block/parallels.c``) does, :func:`decode_bat` and :func:`classify_bat` turn the block
allocation table into cluster kinds, :func:`parse_extension` checks a Format Extension
cluster as ``parallels_parse_format_extension`` (``block/parallels-ext.c``) does.
Nothing here opens a file.

Layout (``docs/interop/parallels.txt``; all fields little-endian)::

    0x00  magic "WithoutFreeSpace" (BAT entries in sectors) or "WithouFreSpacExt"
          (BAT entries in clusters), version (2)
    0x14  heads, cylinders, tracks (cluster size in sectors), bat_entries
    0x24  nb_sectors (u64; only the low 32 bits for "WithoutFreeSpace")
    0x2c  inuse (0x746F6E59 while open read-write: not closed cleanly), data_off,
          flags, ext_off (u64, sectors: the Format Extension cluster)
    0x40  the BAT: bat_entries u32 entries, 0 for a cluster that is not allocated

A guest cluster ``i`` is at file offset ``bat[i] * off_multiplier * 512`` (the
multiplier is 1 or ``tracks``).  There is no compression and no zero cluster.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    TruncatedImage,
    UnsupportedFeature,
)
from qcowlib.formats._clustercodec import bad_entry, decode_entries, field_error
from qcowlib.formats._record import FixedLayout

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U32 = npt.NDArray[np.uint32]
    I64 = npt.NDArray[np.int64]

__all__ = [
    "HEADER",
    "HEADER_INUSE_MAGIC",
    "HEADER_MAGIC",
    "HEADER_MAGIC2",
    "ParallelsBitmap",
    "ParallelsHeader",
    "bat_offsets",
    "classify_bat",
    "decode_bat",
    "parse_extension",
    "parse_header",
]

HEADER_MAGIC: Final = b"WithoutFreeSpace"
HEADER_MAGIC2: Final = b"WithouFreSpacExt"
HEADER_VERSION: Final = 2
#: ``inuse`` while an image is open read-write (QEMU refuses to open it read-write).
HEADER_INUSE_MAGIC: Final = 0x746F6E59
SECTOR: Final = 512
#: BAT entries: little-endian u32.
BAT_ENTRY: Final = "<u4"
#: QEMU: ``tracks > INT32_MAX / 513`` is "Too big cluster".
MAX_TRACKS: Final = 0x7FFFFFFF // 513
#: QEMU: ``bat_entries > INT_MAX / 4`` is "Catalog too large".
MAX_BAT_ENTRIES: Final = 0x7FFFFFFF // 4
#: The largest disk, in sectors: its size in bytes must fit a signed 64-bit integer
#: (QEMU keeps ``total_sectors`` as one).
MAX_SECTORS: Final = ((1 << 63) - 1) // SECTOR

PARALLELS_FORMAT_EXTENSION_MAGIC: Final = 0xAB234CEF23DCEA87
PARALLELS_END_OF_FEATURES_MAGIC: Final = 0
PARALLELS_DIRTY_BITMAP_FEATURE_MAGIC: Final = 0x20385FAE252CB34A

HEADER: Final = FixedLayout(
    "parallels header",
    "<",
    [
        ("magic", "16s"),
        ("version", "I"),
        ("heads", "I"),
        ("cylinders", "I"),
        ("tracks", "I"),
        ("bat_entries", "I"),
        ("nb_sectors", "Q"),
        ("inuse", "I"),
        ("data_off", "I"),
        ("flags", "I"),
        ("ext_off", "Q"),
    ],
)
HEADER_SIZE: Final = HEADER.sizeof()
_FEATURE = struct.Struct("<QQII")
_BITMAP = struct.Struct("<Q16sII")


class ParallelsHeader(NamedTuple):
    """A checked Parallels header (QEMU's field names) and what QEMU derives from it."""

    magic: bytes
    heads: int
    cylinders: int
    tracks: int
    bat_entries: int
    nb_sectors: int
    inuse: int
    data_off: int
    flags: int
    ext_off: int

    @property
    def off_multiplier(self) -> int:
        """Sectors per BAT unit: 1 for "WithoutFreeSpace", ``tracks`` for the other."""
        return 1 if self.magic == HEADER_MAGIC else self.tracks

    @property
    def cluster_size(self) -> int:
        return self.tracks * SECTOR

    @property
    def total_sectors(self) -> int:
        """Disk size in sectors (only 32 bits of ``nb_sectors`` for "WithoutFreeSpace")."""
        if self.magic == HEADER_MAGIC:
            return self.nb_sectors & 0xFFFFFFFF
        return self.nb_sectors

    @property
    def virtual_size(self) -> int:
        return self.total_sectors * SECTOR

    @property
    def bat_bytes(self) -> int:
        return self.bat_entries * 4

    @property
    def unclean(self) -> bool:
        """Whether the image was not closed cleanly (``inuse`` is the in-use magic)."""
        return self.inuse == HEADER_INUSE_MAGIC


def parse_header(data: bytes | bytearray | memoryview, file_size: int) -> ParallelsHeader:
    """Parse and check a Parallels header as QEMU's ``parallels_open`` does.

    The BAT must also lie inside the file (QEMU would read zeros past the end).
    Raises :class:`TruncatedImage`, :class:`FormatError` (bad magic or version) and
    :class:`CorruptImage` (sizes QEMU refuses), naming the field.
    """
    rec = HEADER.parse(data)
    if rec.version != HEADER_VERSION or rec.magic not in (HEADER_MAGIC, HEADER_MAGIC2):
        field = "version" if rec.magic in (HEADER_MAGIC, HEADER_MAGIC2) else "magic"
        raise field_error(HEADER, FormatError, "image not in Parallels format", field)
    h = ParallelsHeader(
        magic=rec.magic,
        heads=rec.heads,
        cylinders=rec.cylinders,
        tracks=rec.tracks,
        bat_entries=rec.bat_entries,
        nb_sectors=rec.nb_sectors,
        inuse=rec.inuse,
        data_off=rec.data_off,
        flags=rec.flags,
        ext_off=rec.ext_off,
    )
    if h.tracks == 0:
        raise field_error(HEADER, CorruptImage, "invalid image: zero sectors per track", "tracks")
    if h.tracks > MAX_TRACKS:
        raise field_error(HEADER, CorruptImage, "invalid image: too big cluster", "tracks")
    if h.bat_entries > MAX_BAT_ENTRIES:
        raise field_error(HEADER, CorruptImage, "catalog too large", "bat_entries")
    if h.total_sectors > MAX_SECTORS:
        raise field_error(HEADER, CorruptImage, "image too large", "nb_sectors")
    if HEADER_SIZE + h.bat_bytes > file_size:
        raise TruncatedImage(
            f"Parallels BAT ({h.bat_entries} entries) extends past the end of the file",
            structure="parallels header",
            field="bat_entries",
            offset=HEADER.offset_of("bat_entries"),
        )
    return h


def decode_bat(raw: bytes | bytearray | memoryview, count: int, offset: int) -> U32:
    """``count`` BAT entries from ``raw`` (read from file offset ``offset``) as native
    ``uint32``.  Raises :class:`TruncatedImage`."""
    return decode_entries(raw, count, BAT_ENTRY, "parallels bat", offset)


def bat_offsets(h: ParallelsHeader, bat: U32) -> npt.NDArray[np.int64]:
    """File offsets in bytes of the clusters the BAT entries name (0: not allocated)."""
    import numpy as np

    return bat.astype(np.int64) * (h.off_multiplier * SECTOR)


def classify_bat(h: ParallelsHeader, bat: U32, file_size: int, first: int = 0) -> tuple[I64, I64]:
    """Cluster numbers and host offsets of the allocated clusters among BAT entries
    ``[first, first + len(bat))`` (a sparse cluster map: the others are unallocated).

    Raises :class:`CorruptImage` for a cluster that starts past the end of the file
    (QEMU's check: "cluster is outside image"; QEMU reads zeros there), naming it.
    """
    import numpy as np

    offsets = bat_offsets(h, bat)
    error = bad_entry(
        offsets > file_size,
        offsets,
        HEADER_SIZE + 4 * first,
        "parallels bat",
        "Parallels cluster {i} (at {v:#x}) is outside the image",
        width=4,
        first=first,
    )
    if error is not None:
        raise error
    present = np.flatnonzero(offsets)
    return present.astype(np.int64) + first, offsets[present]


class ParallelsBitmap(NamedTuple):
    """A dirty bitmap of the Format Extension (QEMU names it by its id)."""

    name: str
    granularity: int
    l1_table: tuple[int, ...]


def _ext_error(message: str, offset: int) -> CorruptImage:
    return CorruptImage(message, structure="parallels format extension", offset=offset)


def parse_extension(cluster: bytes, h: ParallelsHeader, ext_at: int) -> tuple[ParallelsBitmap, ...]:
    """Check the Format Extension cluster (read from ``ext_at``) as QEMU does on a
    read-only open, and return its dirty bitmaps.

    Raises :class:`CorruptImage` (wrong magic or checksum, features that overrun the
    cluster, a malformed bitmap) and :class:`UnsupportedFeature` (feature flags or an
    unknown feature, which QEMU refuses as well).
    """
    cs = h.cluster_size
    if len(cluster) < cs or cs < 24:
        raise _ext_error("Format Extension cluster is truncated", ext_at)
    magic = int.from_bytes(cluster[:8], "little")
    if magic != PARALLELS_FORMAT_EXTENSION_MAGIC:
        raise _ext_error(f"wrong Parallels Format Extension magic {magic:#x}", ext_at)
    if hashlib.md5(cluster[24:cs], usedforsecurity=False).digest() != cluster[8:24]:
        raise _ext_error("wrong checksum in Format Extension header", ext_at + 8)
    pos = 24
    bitmaps: list[ParallelsBitmap] = []
    while True:
        if cs - pos < _FEATURE.size:
            raise _ext_error("Format Extension ends inside a feature header", ext_at + pos)
        fmagic, flags, data_size, _ = _FEATURE.unpack_from(cluster, pos)
        pos += _FEATURE.size
        if flags:
            raise UnsupportedFeature(
                "Parallels Format Extension feature flags are not supported",
                structure="parallels format extension",
                offset=ext_at + pos - 16,
            )
        if data_size > cs - pos:
            raise _ext_error("feature data_size exceeds the Format Extension cluster", ext_at + pos)
        if fmagic == PARALLELS_END_OF_FEATURES_MAGIC:
            return tuple(bitmaps)
        if fmagic != PARALLELS_DIRTY_BITMAP_FEATURE_MAGIC:
            raise UnsupportedFeature(
                f"unknown Parallels Format Extension feature {fmagic:#x}",
                structure="parallels format extension",
                offset=ext_at + pos - _FEATURE.size,
            )
        bitmaps.append(_bitmap(cluster[pos : pos + data_size], h, ext_at + pos))
        pos = -(-(pos + data_size) // 8) * 8


def _bitmap(data: bytes, h: ParallelsHeader, at: int) -> ParallelsBitmap:
    """parallels_load_bitmap's checks of one dirty bitmap feature."""
    if len(data) < _BITMAP.size:
        raise _ext_error("bitmap feature is too small", at)
    size, ident, granularity, l1_size = _BITMAP.unpack_from(data)
    if size != h.total_sectors:
        raise _ext_error(f"bitmap size {size} differs from the disk size in sectors", at)
    if l1_size * 8 > len(data) - _BITMAP.size:
        raise _ext_error("bitmap L1 table exceeds the feature data", at)
    gran = granularity * SECTOR
    if gran < SECTOR or gran & (gran - 1) or gran > 1 << 31:
        raise _ext_error(f"bitmap granularity {gran} is invalid", at)
    bits = -(-h.virtual_size // gran)
    serialized = -(-bits // 64) * 8
    expected = -(-serialized // h.cluster_size)
    if l1_size != expected:
        raise _ext_error(
            f"bitmap table size {l1_size} does not correspond to the bitmap size "
            f"(expected {expected})",
            at,
        )
    l1 = struct.unpack_from(f"<{l1_size}Q", data, _BITMAP.size)
    return ParallelsBitmap(str(uuid.UUID(bytes=ident)), gran, l1)
