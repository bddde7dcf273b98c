"""qcow2 header and feature bits (QEMU ``docs/interop/qcow2.txt``); the header
extensions are :mod:`qcowlib.formats.qcow2.extensions`.

Pure: :func:`parse_header` takes the bytes of the first cluster (or more) and returns a
:class:`Header`; :func:`build_header` turns a :class:`Header` back into bytes.  Every
field is checked against documented caps and, where a file size is given, against the
file size, before anything is allocated from it.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

from qcowlib.errors import CorruptImage, FormatError, TruncatedImage, UnsupportedFeature
from qcowlib.formats._record import FixedLayout
from qcowlib.formats.qcow2.extensions import (
    BitmapsExtension,
    CryptoExtension,
    HeaderExtension,
    decode_known,
    decode_name,
    encode_extensions,
    encode_path,
    feature_names,
    parse_extensions,
)

QCOW_MAGIC: Final = b"QFI\xfb"

# --- sizes and caps (QEMU block/qcow2.h) ------------------------------------------------
MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
#: QCOW_MAX_L1_SIZE: an L1 table larger than 32 MiB would address more than any sane
#: image needs (and more than QEMU opens); checked before allocating it.
MAX_L1_SIZE_BYTES: Final = 32 * 1024 * 1024
#: QCOW_MAX_REFTABLE_SIZE: 8 MiB of refcount table.
MAX_REFTABLE_SIZE_BYTES: Final = 8 * 1024 * 1024
#: QCOW_MAX_SNAPSHOTS and the extra-data cap for one snapshot table entry.
MAX_SNAPSHOTS: Final = 65536
MAX_SNAPSHOT_EXTRA_DATA: Final = 1024
#: The spec limits backing file names to 1023 bytes.
MAX_BACKING_FILE_NAME: Final = 1023
#: Header extensions live in the first cluster; QEMU caps each one there too.
V2_HEADER_LENGTH: Final = 72
V3_HEADER_LENGTH: Final = 104

# --- feature bits ---------------------------------------------------------------------
INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_COMPRESSION: Final = 1 << 3
INCOMPAT_EXTL2: Final = 1 << 4
INCOMPAT_KNOWN: Final = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS: Final = 1 << 0
AUTOCLEAR_BITMAPS: Final = 1 << 0
AUTOCLEAR_DATA_FILE_RAW: Final = 1 << 1

CRYPT_NONE: Final = 0
CRYPT_AES: Final = 1
CRYPT_LUKS: Final = 2

COMPRESSION_TYPE_ZLIB: Final = 0
COMPRESSION_TYPE_ZSTD: Final = 1
COMPRESSION_TYPE_NAMES: Final = {COMPRESSION_TYPE_ZLIB: "zlib", COMPRESSION_TYPE_ZSTD: "zstd"}

#: The fields every qcow2 header has (QEMUs QCowHeader up to snapshots_offset).
HEADER_V2 = FixedLayout(
    "qcow2 header",
    ">",
    [
        ("magic", "4s"),
        ("version", "I"),
        ("backing_file_offset", "Q"),
        ("backing_file_size", "I"),
        ("cluster_bits", "I"),
        ("size", "Q"),
        ("crypt_method", "I"),
        ("l1_size", "I"),
        ("l1_table_offset", "Q"),
        ("refcount_table_offset", "Q"),
        ("refcount_table_clusters", "I"),
        ("nb_snapshots", "I"),
        ("snapshots_offset", "Q"),
    ],
)
HEADER_V3_TAIL = FixedLayout(
    "qcow2 v3 header",
    ">",
    [
        ("incompatible_features", "Q"),
        ("compatible_features", "Q"),
        ("autoclear_features", "Q"),
        ("refcount_order", "I"),
        ("header_length", "I"),
    ],
)


class Header(NamedTuple):
    """A parsed qcow2 header with its extensions.  Field names follow qcow2.txt."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_TYPE_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: tuple[tuple[int, int, str], ...] = ()
    bitmaps: BitmapsExtension | None = None
    crypto: CryptoExtension | None = None
    #: Every extension in file order, including unknown ones, so writers can keep them.
    extensions: tuple[HeaderExtension, ...] = ()
    #: Where the extension area ended (the first byte after the end marker).
    extensions_end: int = 0

    # -- derived values ------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_size(self) -> int:
        """Entries per L2 table."""
        return self.cluster_size // self.l2_entry_size

    @property
    def subclusters_per_cluster(self) -> int:
        return 32 if self.extended_l2 else 1

    @property
    def compat(self) -> str:
        return "0.10" if self.version == 2 else "1.1"

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def compression_type_name(self) -> str:
        return COMPRESSION_TYPE_NAMES.get(self.compression_type, str(self.compression_type))

    def replace(self, **changes: Any) -> Header:
        """A copy with some fields changed (for writers)."""
        return self._replace(**changes)


def l1_entries_needed(size: int, cluster_bits: int, l2_entry_size: int = 8) -> int:
    """How many L1 entries address ``size`` bytes (qcow2.txt: "L1 table size")."""
    l2_bits = cluster_bits - (3 if l2_entry_size == 8 else 4)
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def _check_table(
    name: str, offset: int, entries: int, entry_size: int, cluster_size: int, file_size: int | None
) -> None:
    """Validate a table's offset and extent like QEMU's ``qcow2_validate_table``."""
    if offset % cluster_size:
        raise CorruptImage(
            f"{name} is not cluster aligned", structure="header", field=name, offset=offset
        )
    if file_size is not None and offset + entries * entry_size > file_size:
        raise TruncatedImage(
            f"{name} ({entries} entries) extends past the end of the file",
            structure="header",
            field=name,
            offset=offset,
        )


def parse_header(data: bytes, file_size: int | None = None) -> Header:
    """Parse a qcow2 header and its extensions from the start of a file.

    ``data`` should hold at least the first cluster (up to 2 MiB); the backing file name
    must lie inside it (as QEMU requires: it is read from the first cluster).  With
    ``file_size`` given, tables and names are also checked against the file's end.

    Raises :class:`FormatError` (not qcow2), :class:`TruncatedImage`,
    :class:`CorruptImage` (a field out of its legal range) or :class:`UnsupportedFeature`
    (unknown incompatible feature bits, an unknown compression type).
    """
    fields = _parse_fixed(data)
    cluster_size = 1 << fields["cluster_bits"]
    if fields["version"] == 3:
        fields.update(_parse_v3_tail(data, cluster_size))
    else:
        fields["header_length"] = V2_HEADER_LENGTH
    _check_compression(fields)

    ext_limit = min(len(data), cluster_size)
    backing_file_offset: int = fields["backing_file_offset"]
    if backing_file_offset and backing_file_offset < ext_limit:
        ext_limit = backing_file_offset
    extensions, ext_end = parse_extensions(data, fields["header_length"], ext_limit)
    names = feature_names(extensions)
    _check_incompatible(fields.get("incompatible_features", 0), names)
    known = decode_known(extensions)

    header = Header(
        **fields,
        backing_file=_backing_file_name(data, fields, cluster_size),
        backing_format=known.backing_format,
        data_file=known.data_file,
        feature_names=names,
        bitmaps=known.bitmaps,
        crypto=known.crypto,
        extensions=tuple(extensions),
        extensions_end=ext_end,
    )
    _validate(header, file_size)
    return header


def _parse_fixed(data: bytes) -> dict[str, Any]:
    """The v2 fields (every version's), with magic, version and cluster_bits checked."""
    if len(data) < V2_HEADER_LENGTH:
        raise TruncatedImage("qcow2 header is truncated", structure="header", offset=0)
    v2 = HEADER_V2.parse(data)
    if v2.magic != QCOW_MAGIC:
        raise FormatError("not a qcow2 image (bad magic)", structure="header", field="magic")
    version = v2.version
    if version not in (2, 3):
        raise UnsupportedFeature(
            f"unsupported qcow2 version {version}", structure="header", field="version", offset=4
        )
    cluster_bits = v2.cluster_bits
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(
            f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}",
            structure="header",
            field="cluster_bits",
            offset=20,
        )
    fields: dict[str, Any] = {k: v for k, v in v2.items() if not k.startswith("_")}
    del fields["magic"]
    return fields


def _parse_v3_tail(data: bytes, cluster_size: int) -> dict[str, Any]:
    """The v3 fields after the v2 ones, and the compression type byte if present."""
    if len(data) < V3_HEADER_LENGTH:
        raise TruncatedImage("qcow2 v3 header is truncated", structure="header")
    v3 = HEADER_V3_TAIL.parse(data[V2_HEADER_LENGTH:V3_HEADER_LENGTH])
    fields: dict[str, Any] = {k: v for k, v in v3.items() if not k.startswith("_")}
    header_length = v3.header_length
    if header_length < V3_HEADER_LENGTH or header_length % 8:
        raise CorruptImage(
            f"header_length {header_length} is invalid",
            structure="header",
            field="header_length",
            offset=100,
        )
    if header_length > cluster_size:
        raise CorruptImage(
            "header_length is larger than a cluster",
            structure="header",
            field="header_length",
            offset=100,
        )
    if len(data) < header_length:
        raise TruncatedImage("qcow2 header is truncated", structure="header")
    if header_length > V3_HEADER_LENGTH:
        fields["compression_type"] = data[V3_HEADER_LENGTH]
    if not 0 <= v3.refcount_order <= 6:
        raise CorruptImage(
            f"refcount_order {v3.refcount_order} is outside 0..6",
            structure="header",
            field="refcount_order",
            offset=96,
        )
    return fields


def _check_compression(fields: dict[str, Any]) -> None:
    incompat = fields.get("incompatible_features", 0)
    compression_type = fields.get("compression_type", COMPRESSION_TYPE_ZLIB)
    if bool(incompat & INCOMPAT_COMPRESSION) != (compression_type != COMPRESSION_TYPE_ZLIB):
        raise CorruptImage(
            "compression type and its incompatible feature bit disagree",
            structure="header",
            field="compression_type",
            offset=104,
        )
    if compression_type not in COMPRESSION_TYPE_NAMES:
        raise UnsupportedFeature(
            f"unknown compression type {compression_type}",
            structure="header",
            field="compression_type",
            offset=104,
        )


def _check_incompatible(incompat: int, names: tuple[tuple[int, int, str], ...]) -> None:
    """Refuse incompatible feature bits qcowlib does not know, named from the table."""
    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        found = [n for (t, b, n) in names if t == 0 and unknown & (1 << b)]
        what = ", ".join(found) if found else f"bits {unknown:#x}"
        raise UnsupportedFeature(
            f"unsupported incompatible qcow2 features: {what}",
            structure="header",
            field="incompatible_features",
            offset=72,
        )


def _backing_file_name(data: bytes, fields: dict[str, Any], cluster_size: int) -> str | None:
    """The backing file name, which must lie in the first cluster (and in ``data``)."""
    offset: int = fields["backing_file_offset"]
    size: int = fields["backing_file_size"]
    if not offset:
        return None
    if size > MAX_BACKING_FILE_NAME or size == 0:
        raise CorruptImage(
            f"backing file name length {size} is invalid",
            structure="header",
            field="backing_file_size",
            offset=16,
        )
    end = offset + size
    if end > cluster_size:
        raise CorruptImage(
            "backing file name lies outside the first cluster",
            structure="header",
            field="backing_file_offset",
            offset=8,
        )
    if end > len(data):
        raise TruncatedImage(
            "backing file name is past the end of the file",
            structure="header",
            field="backing_file_offset",
            offset=offset,
        )
    return decode_name(data[offset:end], "backing file name", path=True)


def _validate(h: Header, file_size: int | None) -> None:
    """Range checks that need the whole header (QEMU's qcow2_do_open order)."""
    if h.size % 512:
        raise CorruptImage(
            "virtual size is not a multiple of 512", structure="header", field="size", offset=24
        )
    if h.size >= 1 << 63:
        raise CorruptImage("virtual size is too large", structure="header", field="size", offset=24)
    _validate_tables(h, file_size)
    if h.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
        raise CorruptImage(
            f"unknown crypt_method {h.crypt_method}",
            structure="header",
            field="crypt_method",
            offset=32,
        )
    if h.has_data_file and h.data_file is None:
        raise CorruptImage(
            "external data file bit set but no data file name extension",
            structure="header",
            field="incompatible_features",
            offset=72,
        )
    # A data_file_raw bit without a data file: QEMU clears it on open; reading is
    # unaffected.
    if h.version == 2 and h.refcount_order != 4:
        raise CorruptImage("v2 images have 16-bit refcounts", structure="header")


def _validate_tables(h: Header, file_size: int | None) -> None:
    """The L1 table, refcount table and snapshot table against their caps and the file."""
    cs_ = h.cluster_size
    if h.l1_size * 8 > MAX_L1_SIZE_BYTES:
        raise CorruptImage(
            f"L1 table with {h.l1_size} entries is larger than the "
            f"{MAX_L1_SIZE_BYTES // (1024 * 1024)} MiB cap",
            structure="header",
            field="l1_size",
            offset=36,
        )
    if h.l1_size < l1_entries_needed(h.size, h.cluster_bits, h.l2_entry_size):
        raise CorruptImage(
            "L1 table is too small for the virtual size",
            structure="header",
            field="l1_size",
            offset=36,
        )
    if h.l1_size:
        _check_table("l1_table_offset", h.l1_table_offset, h.l1_size, 8, cs_, file_size)
    if h.refcount_table_clusters * cs_ > MAX_REFTABLE_SIZE_BYTES:
        raise CorruptImage(
            "refcount table is larger than the 8 MiB cap",
            structure="header",
            field="refcount_table_clusters",
            offset=56,
        )
    if h.refcount_table_clusters == 0:
        raise CorruptImage(
            "image has no refcount table",
            structure="header",
            field="refcount_table_clusters",
            offset=56,
        )
    reftable_entries = h.refcount_table_clusters * cs_ // 8
    _check_table(
        "refcount_table_offset", h.refcount_table_offset, reftable_entries, 8, cs_, file_size
    )
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(
            f"too many snapshots ({h.nb_snapshots})",
            structure="header",
            field="nb_snapshots",
            offset=60,
        )
    if h.nb_snapshots:
        _check_table("snapshots_offset", h.snapshots_offset, 1, 40, cs_, file_size)


def build_header(h: Header) -> bytes:
    """Serialize a header and its extensions (in ``h.extensions`` order) to bytes.

    The result covers the header, the extension area with its end marker and, when
    ``h.backing_file`` is set, the backing file name at ``h.backing_file_offset``.
    """
    out = bytearray(
        HEADER_V2.build(
            {
                "magic": QCOW_MAGIC,
                "version": h.version,
                "backing_file_offset": h.backing_file_offset,
                "backing_file_size": h.backing_file_size,
                "cluster_bits": h.cluster_bits,
                "size": h.size,
                "crypt_method": h.crypt_method,
                "l1_size": h.l1_size,
                "l1_table_offset": h.l1_table_offset,
                "refcount_table_offset": h.refcount_table_offset,
                "refcount_table_clusters": h.refcount_table_clusters,
                "nb_snapshots": h.nb_snapshots,
                "snapshots_offset": h.snapshots_offset,
            }
        )
    )
    if h.version == 3:
        out += HEADER_V3_TAIL.build(
            {
                "incompatible_features": h.incompatible_features,
                "compatible_features": h.compatible_features,
                "autoclear_features": h.autoclear_features,
                "refcount_order": h.refcount_order,
                "header_length": h.header_length,
            }
        )
        if h.header_length > V3_HEADER_LENGTH:
            out += bytes([h.compression_type])
            out += bytes(h.header_length - len(out))
    out += encode_extensions(h.extensions)
    if h.backing_file is not None:
        name = encode_path(h.backing_file)
        if h.backing_file_offset < len(out):
            raise CorruptImage("backing file name would overlap the header extensions")
        out += bytes(h.backing_file_offset - len(out))
        out += name
    return bytes(out)
