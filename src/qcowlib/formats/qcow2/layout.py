"""Creation parameters and metadata layout arithmetic for new qcow2 images.

Pure: given what a new image must hold, decide where its header, refcount table,
refcount blocks, L1 and L2 tables go, and build their bytes.  Writers (``create``,
``convert``, the stream serializer) and ``measure`` share these rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np

from qcowlib.errors import InvalidArgument
from qcowlib.formats.qcow2 import extensions as hext
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import refcount, tables

DEFAULT_CLUSTER_SIZE: Final = 65536
#: QEMU's feature name table, written into v3 headers so tools can name the bits.
FEATURE_NAMES: Final = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)
PREALLOCATION_MODES: Final = ("off", "metadata", "falloc", "full")


@dataclass(frozen=True)
class CreateOptions:
    """qcow2 creation options, named as qemu-img's ``-o`` keys."""

    size: int
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    compat: str = "1.1"
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: str = "zlib"
    preallocation: str = "off"
    backing_file: str | None = None
    backing_fmt: str | None = None

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def version(self) -> int:
        return 2 if self.compat == "0.10" else 3

    @property
    def refcount_order(self) -> int:
        return self.refcount_bits.bit_length() - 1

    @property
    def compression_type_id(self) -> int:
        return hdr.COMPRESSION_TYPE_ZSTD if self.compression_type == "zstd" else 0

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def virtual_size(self) -> int:
        """qemu rounds the size up to whole 512-byte sectors."""
        return -(-self.size // 512) * 512


def parse_options(size: int, options: dict[str, str]) -> CreateOptions:
    """Build and validate :class:`CreateOptions` from ``-o`` key/values and a size.

    Raises :class:`InvalidArgument` with qemu-img's wording for invalid combinations.
    """
    from qcowlib._units import (
        parse_option_bool,
        parse_option_number,
        parse_option_size,
    )

    known = {
        "cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2",
        "compression_type", "preallocation", "backing_file", "backing_fmt", "size",
    }  # fmt: skip
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgument(f"Invalid parameter '{unknown[0]}'")
    kw: dict[str, object] = {}
    if "size" in options:
        size = parse_option_size("size", options["size"])
    if "cluster_size" in options:
        kw["cluster_size"] = parse_option_size("cluster_size", options["cluster_size"])
    if "compat" in options:
        compat = options["compat"]
        if compat in ("0.10", "v2"):
            kw["compat"] = "0.10"
        elif compat in ("1.1", "v3"):
            kw["compat"] = "1.1"
        else:
            raise InvalidArgument(f"Invalid compatibility level: '{compat}'")
    if "refcount_bits" in options:
        kw["refcount_bits"] = parse_option_number("refcount_bits", options["refcount_bits"])
    for key in ("lazy_refcounts", "extended_l2"):
        if key in options:
            kw[key] = parse_option_bool(key, options[key])
    if "compression_type" in options:
        kw["compression_type"] = options["compression_type"]
    if "preallocation" in options:
        kw["preallocation"] = options["preallocation"]
    for key in ("backing_file", "backing_fmt"):
        if options.get(key):
            kw[key] = options[key]
    opts = CreateOptions(size=size, **kw)  # type: ignore[arg-type]
    validate_options(opts)
    return opts


def validate_options(o: CreateOptions) -> None:
    """The refusals of QEMU's ``qcow2_co_create`` for impossible combinations."""
    cs = o.cluster_size
    if cs <= 0 or cs & (cs - 1) or not 512 <= cs <= (1 << hdr.MAX_CLUSTER_BITS):
        raise InvalidArgument("Cluster size must be a power of two between 512 and 2048k")
    rb = o.refcount_bits
    if rb <= 0 or rb > 64 or rb & (rb - 1):
        raise InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits")
    if o.version == 2:
        if rb != 16:
            raise InvalidArgument(
                "Different refcount widths than 16 bits require compatibility level 1.1 or "
                "above (use compat=1.1 or greater)"
            )
        if o.lazy_refcounts:
            raise InvalidArgument(
                "Lazy refcounts only supported with compatibility level 1.1 and above "
                "(use compat=1.1 or greater)"
            )
        if o.extended_l2:
            raise InvalidArgument(
                "Extended L2 entries are only supported with compatibility level 1.1 and "
                "above (use compat=1.1 or greater)"
            )
        if o.compression_type != "zlib":
            raise InvalidArgument(
                "Non-zlib compression type is only supported with compatibility level "
                "1.1 and above (use compat=1.1 or greater)"
            )
    if o.extended_l2 and cs < 16384:
        raise InvalidArgument(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    if o.compression_type not in ("zlib", "zstd"):
        raise InvalidArgument(
            f"Invalid parameter value for 'compression_type': '{o.compression_type}'"
        )
    if o.preallocation not in PREALLOCATION_MODES:
        raise InvalidArgument(f"Invalid parameter value for 'preallocation': '{o.preallocation}'")
    if o.backing_fmt and not o.backing_file:
        raise InvalidArgument("Backing format cannot be used without backing file")
    if o.backing_file and o.preallocation != "off" and not o.extended_l2:
        raise InvalidArgument(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    if o.size < 0:
        raise InvalidArgument("Image size must be a non-negative number")
    l1 = hdr.l1_entries_needed(o.virtual_size, o.cluster_bits, o.l2_entry_size)
    if l1 * 8 > hdr.MAX_L1_SIZE_BYTES:
        raise InvalidArgument("Image size is too large for this cluster size")


def clusters(nbytes: int, cluster_size: int) -> int:
    return -(-nbytes // cluster_size)


def refcount_clusters(
    other_clusters: int, cluster_bits: int, refcount_order: int
) -> tuple[int, int]:
    """(refcount table clusters, refcount blocks) to cover ``other_clusters`` plus
    the refcount structures themselves (QEMU's ``qcow2_refcount_metadata_size``)."""
    cs = 1 << cluster_bits
    per_block = refcount.entries_per_block(cluster_bits, refcount_order)
    rt, rb = 0, 0
    while True:
        total = other_clusters + rt + rb
        new_rb = clusters(total, per_block)
        new_rt = clusters(new_rb * 8, cs)
        if (new_rb, new_rt) == (rb, rt):
            return rt, rb
        rt, rb = new_rt, new_rb


@dataclass
class Layout:
    """Where a new image's metadata lives; data goes from ``data_offset`` on."""

    cluster_size: int
    reftable_offset: int
    reftable_clusters: int
    refblocks_offset: int
    refblock_count: int
    l1_offset: int
    l1_size: int
    #: L2 table offset per L1 index (0: no table).
    l2_offsets: tables.U64 = field(repr=False)
    data_offset: int = 0

    @property
    def metadata_end(self) -> int:
        return self.data_offset


def plan_layout(opts: CreateOptions, l2_needed: np.ndarray, data_clusters: int) -> Layout:
    """Lay out header, refcount structures, L1 and the L2 tables flagged in ``l2_needed``.

    ``data_clusters`` is an upper bound on the data clusters that will follow; the
    refcount blocks cover everything up to that bound.
    """
    cs = opts.cluster_size
    l1_size = hdr.l1_entries_needed(opts.virtual_size, opts.cluster_bits, opts.l2_entry_size)
    l1_clusters = clusters(l1_size * 8, cs)
    n_l2 = int(np.count_nonzero(l2_needed))
    other = 1 + l1_clusters + n_l2 + data_clusters
    rt, rb = refcount_clusters(other, opts.cluster_bits, opts.refcount_order)
    pos = cs  # cluster 0 is the header
    reftable_offset = pos
    pos += rt * cs
    refblocks_offset = pos
    pos += rb * cs
    l1_offset = pos
    pos += l1_clusters * cs
    l2_offsets = np.zeros(l1_size, dtype=np.uint64)
    idx = np.flatnonzero(l2_needed[:l1_size])
    l2_offsets[idx] = pos + np.arange(idx.size, dtype=np.uint64) * np.uint64(cs)
    pos += n_l2 * cs
    return Layout(
        cs, reftable_offset, rt, refblocks_offset, rb, l1_offset, l1_size, l2_offsets, pos
    )


def build_refcount_structures(
    layout: Layout, counts: tables.U64, refcount_order: int
) -> tuple[bytes, bytes]:
    """Refcount table bytes and the contiguous refcount blocks' bytes for ``counts``
    (one refcount per host cluster from 0)."""
    cs = layout.cluster_size
    cluster_bits = cs.bit_length() - 1
    per_block = refcount.entries_per_block(cluster_bits, refcount_order)
    if counts.size > layout.refblock_count * per_block:
        raise InvalidArgument("internal: refcount blocks do not cover the image")
    padded = np.zeros(layout.refblock_count * per_block, dtype=np.uint64)
    padded[: counts.size] = counts
    blocks = refcount.encode_block(padded, refcount_order)
    table = np.zeros(layout.reftable_clusters * cs // 8, dtype=np.uint64)
    table[: layout.refblock_count] = layout.refblocks_offset + np.arange(
        layout.refblock_count, dtype=np.uint64
    ) * np.uint64(cs)
    return tables.encode_table(table), blocks


def build_new_header(opts: CreateOptions, layout: Layout, *, dirty: bool = False) -> bytes:
    """The first cluster of a new image: header, extensions and backing file name."""
    exts: list[hext.HeaderExtension] = []
    if opts.backing_file and opts.backing_fmt:
        exts.append(hext.extension(hext.EXT_BACKING_FORMAT, opts.backing_fmt.encode()))
    if opts.version == 3:
        exts.append(hext.feature_table_extension(list(FEATURE_NAMES)))
    incompat = 0
    if opts.extended_l2:
        incompat |= hdr.INCOMPAT_EXTL2
    if opts.compression_type_id:
        incompat |= hdr.INCOMPAT_COMPRESSION
    if dirty:
        incompat |= hdr.INCOMPAT_DIRTY
    header_length = 112 if opts.version == 3 else hdr.V2_HEADER_LENGTH
    ext_end = header_length + sum(8 + clusters(len(e.data), 8) * 8 for e in exts) + 8
    name = hext.encode_path(opts.backing_file) if opts.backing_file else b""
    if len(name) > hdr.MAX_BACKING_FILE_NAME:
        raise InvalidArgument("Backing file name too long")
    if ext_end + len(name) > opts.cluster_size and opts.version == 3:
        # Drop the optional feature name table rather than fail on small clusters.
        exts = [e for e in exts if e.type != hext.EXT_FEATURE_TABLE]
        ext_end = header_length + sum(8 + clusters(len(e.data), 8) * 8 for e in exts) + 8
    if ext_end + len(name) > opts.cluster_size:
        raise InvalidArgument("Header and backing file name do not fit in one cluster")
    h = hdr.Header(
        version=opts.version,
        backing_file_offset=ext_end if name else 0,
        backing_file_size=len(name),
        cluster_bits=opts.cluster_bits,
        size=opts.virtual_size,
        crypt_method=0,
        l1_size=layout.l1_size,
        l1_table_offset=layout.l1_offset,
        refcount_table_offset=layout.reftable_offset,
        refcount_table_clusters=layout.reftable_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=incompat,
        compatible_features=hdr.COMPAT_LAZY_REFCOUNTS if opts.lazy_refcounts else 0,
        autoclear_features=0,
        refcount_order=opts.refcount_order,
        header_length=header_length,
        compression_type=opts.compression_type_id,
        backing_file=opts.backing_file,
        backing_format=opts.backing_fmt,
        extensions=tuple(exts),
    )
    return hdr.build_header(h)
