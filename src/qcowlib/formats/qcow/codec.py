"""Legacy QCOW (version 1): the header, the L1/L2 tables and compressed clusters.

Pure: :func:`parse_header` checks a header as QEMU's ``qcow_open`` (``block/qcow.c``)
does, :func:`classify_l2` turns an L2 table into cluster kinds, :func:`decompress`
inflates a compressed cluster.  Nothing here opens a file.

Layout (QEMU ``QCowHeader``; all fields big-endian)::

    0x00  magic "QFI\\xfb", version (1)
    0x08  backing_file_offset (u64), backing_file_size (u32), mtime (u32)
    0x18  size (u64, bytes)
    0x20  cluster_bits (u8), l2_bits (u8), padding (u16), crypt_method (u32)
    0x28  l1_table_offset (u64)

The L1 table has one u64 per ``2 ** (cluster_bits + l2_bits)`` guest bytes: 0 (no L2
table) or the file offset of an L2 table of ``2 ** l2_bits`` u64 entries.  An L2 entry
is 0 (unallocated: the backing file shows through), the 512-aligned file offset of a
data cluster, or, with bit 63 set, a compressed cluster: its offset in the low
``63 - cluster_bits`` bits and its compressed size above them, a raw deflate stream
(zlib window bits 12) that inflates to exactly one cluster.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    TruncatedImage,
    UnsupportedFeature,
)
from qcowlib.formats._clustercodec import (
    bad_entry,
    decode_backing_name,
    decode_entries,
    field_error,
)
from qcowlib.formats._record import FixedLayout

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U64 = npt.NDArray[np.uint64]
    U8 = npt.NDArray[np.uint8]
    I64 = npt.NDArray[np.int64]

__all__ = [
    "HEADER",
    "QCOW_CRYPT_AES",
    "QCOW_CRYPT_NONE",
    "QCOW_MAGIC",
    "QCOW_OFLAG_COMPRESSED",
    "QcowHeader",
    "classify_l2",
    "decode_backing_name",
    "decode_table",
    "decompress",
    "parse_header",
]

QCOW_MAGIC: Final = b"QFI\xfb"
QCOW_VERSION: Final = 1
QCOW_CRYPT_NONE: Final = 0
QCOW_CRYPT_AES: Final = 1
QCOW_OFLAG_COMPRESSED: Final = 1 << 63
#: QEMU reads at most this many bytes of backing file name (``len > 1023`` is refused).
QCOW_MAX_BACKING_NAME: Final = 1023
#: QEMU: the L1 table must fit ``INT_MAX`` bytes.
QCOW_MAX_L1_BYTES: Final = 0x7FFFFFFF
#: Table entries: big-endian u64.
TABLE_ENTRY: Final = ">u8"
_UINT64_MAX: Final = (1 << 64) - 1
SECTOR: Final = 512

HEADER: Final = FixedLayout(
    "qcow header",
    ">",
    [
        ("magic", "4s"),
        ("version", "I"),
        ("backing_file_offset", "Q"),
        ("backing_file_size", "I"),
        ("mtime", "I"),
        ("size", "Q"),
        ("cluster_bits", "B"),
        ("l2_bits", "B"),
        ("padding", "H"),
        ("crypt_method", "I"),
        ("l1_table_offset", "Q"),
    ],
)
HEADER_SIZE: Final = HEADER.sizeof()


class QcowHeader(NamedTuple):
    """A checked qcow v1 header (QEMU's field names)."""

    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    crypt_method: int
    l1_table_offset: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_size(self) -> int:
        """Entries in an L2 table."""
        return 1 << self.l2_bits

    @property
    def l1_size(self) -> int:
        """Entries in the L1 table."""
        shift = self.cluster_bits + self.l2_bits
        return (self.size + (1 << shift) - 1) >> shift

    @property
    def virtual_size(self) -> int:
        """The disk size QEMU uses: ``size`` rounded down to whole sectors."""
        return self.size // SECTOR * SECTOR

    @property
    def cluster_offset_mask(self) -> int:
        return (1 << (63 - self.cluster_bits)) - 1

    @property
    def has_backing_file(self) -> bool:
        return self.backing_file_offset != 0


def parse_header(data: bytes | bytearray | memoryview, file_size: int) -> QcowHeader:
    """Parse and check a qcow v1 header as QEMU's ``qcow_open`` does.

    With ``file_size``, the L1 table must also lie inside the file (QEMU would read
    zeros past the end).  Raises :class:`TruncatedImage`, :class:`FormatError` (bad
    magic), :class:`UnsupportedFeature` (another version; encrypted images, which
    qcowlib does not decrypt) and :class:`CorruptImage` (sizes QEMU refuses), naming the
    field.
    """
    rec = HEADER.parse(data)
    if rec.magic != QCOW_MAGIC:
        raise field_error(HEADER, FormatError, "image not in qcow format", "magic")
    if rec.version != QCOW_VERSION:
        raise field_error(
            HEADER,
            UnsupportedFeature,
            f"qcow (v1) does not support qcow version {rec.version}",
            "version",
        )
    if rec.size <= 1:
        raise field_error(
            HEADER, CorruptImage, "image size is too small (must be at least 2 bytes)", "size"
        )
    if not 9 <= rec.cluster_bits <= 16:
        raise field_error(
            HEADER, CorruptImage, "cluster size must be between 512 and 64k", "cluster_bits"
        )
    if not 9 - 3 <= rec.l2_bits <= 16 - 3:
        raise field_error(
            HEADER, CorruptImage, "L2 table size must be between 512 and 64k", "l2_bits"
        )
    if rec.crypt_method not in (QCOW_CRYPT_NONE, QCOW_CRYPT_AES):
        raise field_error(
            HEADER, CorruptImage, "invalid encryption method in qcow header", "crypt_method"
        )
    h = QcowHeader(
        backing_file_offset=rec.backing_file_offset,
        backing_file_size=rec.backing_file_size,
        mtime=rec.mtime,
        size=rec.size,
        cluster_bits=rec.cluster_bits,
        l2_bits=rec.l2_bits,
        crypt_method=rec.crypt_method,
        l1_table_offset=rec.l1_table_offset,
    )
    shift = h.cluster_bits + h.l2_bits
    if h.size > _UINT64_MAX - (1 << shift) or h.l1_size * 8 > QCOW_MAX_L1_BYTES:
        raise field_error(HEADER, CorruptImage, "image too large", "size")
    if h.l1_table_offset + h.l1_size * 8 > file_size:
        raise TruncatedImage(
            f"qcow L1 table ({h.l1_size} entries at {h.l1_table_offset:#x}) extends past the "
            "end of the file",
            structure="qcow header",
            field="l1_table_offset",
            offset=HEADER.offset_of("l1_table_offset"),
        )
    if h.has_backing_file and h.backing_file_size > QCOW_MAX_BACKING_NAME:
        raise field_error(HEADER, CorruptImage, "backing file name too long", "backing_file_size")
    return h


def decode_table(raw: bytes | bytearray | memoryview, entries: int, offset: int) -> U64:
    """``entries`` table entries (an L1 table, or L2 tables one after another) as
    native ``uint64``.  Raises :class:`TruncatedImage`."""
    return decode_entries(raw, entries, TABLE_ENTRY, "qcow table", offset)


def classify_l2(
    h: QcowHeader, l2: U64, l2_offset: int | Sequence[int], file_size: int
) -> tuple[U8, I64, I64]:
    """Kinds (``RUN_*``), host offsets and compressed sizes of L2 table entries: one
    table read from ``l2_offset``, or the rows of a 2-D array, each read from its offset
    in ``l2_offset``.

    Raises :class:`CorruptImage` for a data cluster that is not 512-aligned (QEMU fails
    the read) or that starts past the end of the file, and for a compressed cluster
    whose data starts past the end of the file, naming the entry.
    """
    import numpy as np

    from qcowlib.core.disk import RUN_COMPRESSED, RUN_DATA, RUN_UNALLOCATED

    compressed = (l2 & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
    data = (l2 != 0) & ~compressed
    shift = np.uint64(63 - h.cluster_bits)
    coffset = l2 & np.uint64(h.cluster_offset_mask)
    csize = (l2 >> shift) & np.uint64(h.cluster_size - 1)
    host = np.where(compressed, coffset, l2)
    error = bad_entry(
        (data & ((l2 & np.uint64(SECTOR - 1)) != 0))
        | ((data | compressed) & (host >= np.uint64(file_size))),
        l2,
        l2_offset,
        "qcow l2 table",
        "qcow L2 entry {i} ({v:#x}) points outside the file or is misaligned",
    )
    if error is not None:
        raise error
    kind = np.where(data, RUN_DATA, np.where(compressed, RUN_COMPRESSED, RUN_UNALLOCATED))
    host_i = np.where(data | compressed, host.astype(np.int64), -1).astype(np.int64)
    clen = np.where(compressed, csize.astype(np.int64), 0).astype(np.int64)
    return kind.astype(np.uint8), host_i, clen


def decompress(data: bytes, cluster_size: int, offset: int) -> bytes:
    """Inflate one compressed cluster (QEMU ``decompress_buffer``: raw deflate, window
    bits 12, exactly ``cluster_size`` bytes out).  Raises :class:`CorruptImage`."""
    try:
        inflater = zlib.decompressobj(-12)
        out = inflater.decompress(data, cluster_size)
    except zlib.error as exc:
        raise CorruptImage(
            f"compressed cluster does not inflate: {exc}", structure="qcow cluster", offset=offset
        ) from None
    if len(out) != cluster_size:
        raise CorruptImage(
            f"compressed cluster inflates to {len(out)} bytes, not {cluster_size}",
            structure="qcow cluster",
            offset=offset,
        )
    return out
