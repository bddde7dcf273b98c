"""QED (QEMU Enhanced Disk): the header and the L1/L2 tables.

Pure: :func:`parse_header` turns the first bytes of a file into a :class:`QedHeader`
and checks it as QEMU's ``bdrv_qed_do_open`` does; :func:`decode_table` turns a table's
bytes into offsets and :func:`classify_l2` an L2 table into cluster kinds.  Nothing here
opens a file.

Layout (``docs/interop/qed_spec.txt``, QEMU ``block/qed.h``; all fields
little-endian)::

    0x00  magic "QED\\0", cluster_size, table_size (clusters per table),
          header_size (clusters before the first regular cluster)
    0x10  features, compat_features, autoclear_features (u64 each)
    0x28  l1_table_offset, image_size (u64 each)
    0x38  backing_filename_offset, backing_filename_size (u32 each, bytes from 0)

Tables hold ``table_size * cluster_size / 8`` little-endian u64 offsets.  An L1 entry
is 0 (no L2 table) or the file offset of an L2 table; an L2 entry is 0 (unallocated:
the backing file shows through), 1 (a zero cluster) or the file offset of a data
cluster.  Data is never compressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib.errors import (
    CorruptImage,
    FormatError,
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
    "QED_F_BACKING_FILE",
    "QED_F_BACKING_FORMAT_NO_PROBE",
    "QED_F_NEED_CHECK",
    "QED_MAGIC",
    "QedHeader",
    "check_cluster_offset",
    "check_table_offset",
    "classify_l2",
    "decode_backing_name",
    "decode_table",
    "max_image_size",
    "parse_header",
]

QED_MAGIC: Final = b"QED\0"
#: The image has a backing file (its name is in the header cluster).
QED_F_BACKING_FILE: Final = 0x01
#: The image was not closed cleanly; QEMU checks (and repairs) it when opening it
#: read-write.  Reading it is safe.
QED_F_NEED_CHECK: Final = 0x02
#: The backing file is raw: its format must not be probed.
QED_F_BACKING_FORMAT_NO_PROBE: Final = 0x04
QED_FEATURE_MASK: Final = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE
QED_MIN_CLUSTER_SIZE: Final = 4 * 1024
QED_MAX_CLUSTER_SIZE: Final = 64 * 1024 * 1024
QED_MIN_TABLE_SIZE: Final = 1
QED_MAX_TABLE_SIZE: Final = 16
#: The longest backing file name QEMU reads (``bs->backing_file`` is PATH_MAX bytes,
#: with the NUL).
QED_MAX_BACKING_NAME: Final = 4095
#: Largest table qcowlib reads (QEMU allows 16 clusters of 64 MiB, 1 GiB, a table;
#: qemu-img creates 256 KiB ones).  Decoding a table costs about ten times its size in
#: memory, so larger ones are refused as unsupported rather than read.
QED_MAX_TABLE_BYTES: Final = 256 << 20
#: L2 entry of a zero cluster (QEMU ``qed_offset_is_zero_cluster``).
QED_ZERO_CLUSTER: Final = 1
SECTOR: Final = 512
#: Table entries: little-endian u64 file offsets.
TABLE_ENTRY: Final = "<u8"
_UINT32_MAX: Final = 0xFFFFFFFF
_UINT64_MASK: Final = (1 << 64) - 1

HEADER: Final = FixedLayout(
    "qed header",
    "<",
    [
        ("magic", "4s"),
        ("cluster_size", "I"),
        ("table_size", "I"),
        ("header_size", "I"),
        ("features", "Q"),
        ("compat_features", "Q"),
        ("autoclear_features", "Q"),
        ("l1_table_offset", "Q"),
        ("image_size", "Q"),
        ("backing_filename_offset", "I"),
        ("backing_filename_size", "I"),
    ],
)
HEADER_SIZE: Final = HEADER.sizeof()


class QedHeader(NamedTuple):
    """A QED header, QEMU's field names; ``file_size`` is the file's size rounded down
    to whole clusters, as QEMU keeps it (``BDRVQEDState.file_size``)."""

    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int
    file_size: int

    @property
    def table_nelems(self) -> int:
        """Entries in an L1 or L2 table."""
        return self.table_size * self.cluster_size // 8

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.table_nelems * self.cluster_size

    @property
    def has_backing_file(self) -> bool:
        return bool(self.features & QED_F_BACKING_FILE)

    @property
    def need_check(self) -> bool:
        return bool(self.features & QED_F_NEED_CHECK)

    @property
    def backing_is_raw(self) -> bool:
        return self.has_backing_file and bool(self.features & QED_F_BACKING_FORMAT_NO_PROBE)


def max_image_size(cluster_size: int, table_size: int) -> int:
    """The largest image a geometry addresses (QEMU ``qed_max_image_size``)."""
    entries = table_size * cluster_size // 8
    return entries * cluster_size * entries


def _power_of_two_in(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def check_cluster_offset(h: QedHeader, offset: int) -> bool:
    """QEMU ``qed_check_cluster_offset``: aligned, past the header, inside the file."""
    if offset & (h.cluster_size - 1):
        return False
    return h.header_size * h.cluster_size <= offset < h.file_size


def check_table_offset(h: QedHeader, offset: int) -> bool:
    """QEMU ``qed_check_table_offset``: a whole table's clusters are valid offsets.

    As in QEMU, the 64-bit overflow check also refuses every table of an image whose
    ``table_size`` is 1 (QEMU cannot open such images either).
    """
    end_offset = (offset + (h.table_size - 1) * h.cluster_size) & _UINT64_MASK
    if end_offset <= offset:
        return False
    return check_cluster_offset(h, offset) and check_cluster_offset(h, end_offset)


def parse_header(data: bytes | bytearray | memoryview, file_size: int) -> QedHeader:
    """Parse and check a QED header as QEMU's ``bdrv_qed_do_open`` does.

    ``file_size`` is the size of the file in bytes.  Raises :class:`TruncatedImage`
    (fewer than 64 bytes), :class:`FormatError` (bad magic), :class:`UnsupportedFeature`
    (unknown feature bits) and :class:`CorruptImage` (sizes and offsets QEMU refuses,
    naming the field).
    """
    rec = HEADER.parse(data)
    if rec.magic != QED_MAGIC:
        raise field_error(HEADER, FormatError, "image not in QED format", "magic")
    unknown = rec.features & ~QED_FEATURE_MASK
    if unknown:
        raise field_error(
            HEADER, UnsupportedFeature, f"unsupported QED features: {unknown:x}", "features"
        )
    cs = rec.cluster_size
    if not _power_of_two_in(cs, QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE):
        raise field_error(HEADER, CorruptImage, f"QED cluster size {cs} is invalid", "cluster_size")
    ts = rec.table_size
    if not _power_of_two_in(ts, QED_MIN_TABLE_SIZE, QED_MAX_TABLE_SIZE):
        raise field_error(HEADER, CorruptImage, f"QED table size {ts} is invalid", "table_size")
    if cs * ts > QED_MAX_TABLE_BYTES:
        raise field_error(
            HEADER,
            UnsupportedFeature,
            f"QED tables of {cs * ts} bytes are larger than qcowlib reads ({QED_MAX_TABLE_BYTES})",
            "table_size",
        )
    if rec.image_size % SECTOR or rec.image_size > max_image_size(cs, ts):
        raise field_error(
            HEADER, CorruptImage, f"QED image size {rec.image_size} is invalid", "image_size"
        )
    h = QedHeader(
        cluster_size=cs,
        table_size=ts,
        header_size=rec.header_size,
        features=rec.features,
        compat_features=rec.compat_features,
        autoclear_features=rec.autoclear_features,
        l1_table_offset=rec.l1_table_offset,
        image_size=rec.image_size,
        backing_filename_offset=rec.backing_filename_offset,
        backing_filename_size=rec.backing_filename_size,
        file_size=file_size & ~(cs - 1),
    )
    if not check_table_offset(h, h.l1_table_offset):
        raise field_error(
            HEADER,
            CorruptImage,
            f"QED L1 table offset {h.l1_table_offset:#x} is invalid (misaligned, inside the "
            "header or past the end of the file)",
            "l1_table_offset",
        )
    if h.header_size > _UINT32_MAX // cs:
        raise field_error(HEADER, CorruptImage, "QED header size is too large", "header_size")
    if h.has_backing_file:
        _check_backing_name(h)
    return h


def _check_backing_name(h: QedHeader) -> None:
    if h.backing_filename_offset + h.backing_filename_size > h.cluster_size * h.header_size:
        raise field_error(
            HEADER,
            CorruptImage,
            "QED backing filename offset is invalid",
            "backing_filename_offset",
        )
    if h.backing_filename_size > QED_MAX_BACKING_NAME:
        raise field_error(
            HEADER,
            CorruptImage,
            f"QED backing file name is too long ({h.backing_filename_size} bytes)",
            "backing_filename_size",
        )


def decode_table(
    raw: bytes | bytearray | memoryview, h: QedHeader, offset: int, tables: int = 1
) -> U64:
    """A table's entries (or ``tables`` tables' one after another) as native ``uint64``;
    ``offset`` is where the first is in the file.  Raises :class:`TruncatedImage`."""
    return decode_entries(raw, tables * h.table_nelems, TABLE_ENTRY, "qed table", offset)


def valid_cluster_offsets(h: QedHeader, entries: U64) -> npt.NDArray[np.bool_]:
    """Which entries are valid cluster offsets (vectorised ``check_cluster_offset``)."""
    import numpy as np

    low = np.uint64(h.header_size * h.cluster_size)
    aligned = (entries & np.uint64(h.cluster_size - 1)) == 0
    valid: npt.NDArray[np.bool_] = aligned & (entries >= low) & (entries < np.uint64(h.file_size))
    return valid


def valid_table_offsets(h: QedHeader, offsets: U64) -> npt.NDArray[np.bool_]:
    """Vectorised :func:`check_table_offset`."""
    import numpy as np

    end = offsets + np.uint64((h.table_size - 1) * h.cluster_size)  # wraps as in QEMU
    valid: npt.NDArray[np.bool_] = (
        (end > offsets) & valid_cluster_offsets(h, offsets) & valid_cluster_offsets(h, end)
    )
    return valid


def classify_l2(h: QedHeader, l2: U64, l2_offset: int | Sequence[int]) -> tuple[U8, I64]:
    """Cluster kinds (``RUN_*``) and host offsets of L2 table entries: one table read
    from ``l2_offset``, or the rows of a 2-D array, each read from its offset in
    ``l2_offset``.

    Raises :class:`CorruptImage` for an entry that is neither 0, 1 nor a valid cluster
    offset (QEMU fails the read with EINVAL), naming it.
    """
    import numpy as np

    from qcowlib.core.disk import RUN_DATA, RUN_UNALLOCATED, RUN_ZERO

    unalloc = l2 == 0
    zero = l2 == QED_ZERO_CLUSTER
    data = ~(unalloc | zero)
    error = bad_entry(
        data & ~valid_cluster_offsets(h, l2),
        l2,
        l2_offset,
        "qed l2 table",
        "QED L2 entry {i} points to invalid cluster offset {v:#x}",
    )
    if error is not None:
        raise error
    kind = np.where(data, RUN_DATA, np.where(zero, RUN_ZERO, RUN_UNALLOCATED)).astype(np.uint8)
    host = np.where(data, l2.astype(np.int64), -1).astype(np.int64)
    return kind, host
