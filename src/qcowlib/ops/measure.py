"""``measure``: the file size a new image needs, as ``qemu-img measure`` computes it.

Follows QEMU 7.2: ``qcow2_measure`` with ``qcow2_calc_prealloc_size`` and
``qcow2_refcount_metadata_size`` (block/qcow2.c), ``qcow2_get_persistent_dirty_bitmap_size``
(block/qcow2-bitmap.c), ``raw_measure`` (block/raw-format.c), and the option handling of
``img_measure`` (qemu-img.c): ``-o`` options are first checked against the output
format's creation options and their types, then the format's measure function refuses
what it cannot create.

``fully-allocated`` is the size of the image with every cluster allocated.  ``required``
is that minus the data clusters the source leaves unallocated or zero: a cluster of the
*output* counts when any byte of it is data (or compressed data) anywhere in the source's
chain; zero and unallocated ranges never count (qemu skips ``BDRV_BLOCK_ZERO`` runs, which
is safe because the new image has no backing file).  Metadata is counted as for the fully
allocated image, so ``required`` overestimates a little, exactly as qemu-img does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from qcowlib._units import (
    align_up,
    div_round_up,
    parse_option_bool,
    parse_option_number,
    parse_option_size,
)
from qcowlib.core.chain import BackingPolicy
from qcowlib.core.disk import Disk, Extent, ExtentKind
from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2.bitmap import BITMAP_DIR_ENTRY_SIZE
from qcowlib.formats.qcow2.layout import DEFAULT_CLUSTER_SIZE, refcount_clusters

__all__ = [
    "MEASURABLE_FORMATS",
    "allocated_clusters",
    "bitmaps_size",
    "calc_prealloc_size",
    "measure",
    "measure_disk",
    "render_human",
]

#: Output formats whose size can be measured (QEMU drivers with ``bdrv_measure``).
MEASURABLE_FORMATS: Final = ("qcow2", "raw")
#: Formats QEMU can create but not measure ("Block driver ... does not support size
#: measurement").
_CREATE_ONLY: Final = frozenset(
    {"vmdk", "vdi", "vpc", "vhdx", "qcow", "qed", "parallels", "file", "host_device", "nbd"}
)
#: Formats QEMU knows but cannot create at all.
_READ_ONLY: Final = frozenset({"bochs", "cloop", "dmg", "vvfat", "iso"})

_L1E_SIZE: Final = 8
#: QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER * (1 << MIN_CLUSTER_BITS).
_MIN_EXTL2_CLUSTER_SIZE: Final = 32 * 512
#: sizeof(Qcow2BitmapDirEntry) without the name and extra data.
_BITMAP_DIR_ENTRY_SIZE: Final = BITMAP_DIR_ENTRY_SIZE
_BITMAP_TABLE_ENTRY_SIZE: Final = 8
_SECTOR: Final = 512

# Option types as declared by QEMU's creation option lists (``qemu-img create -o help``).
_BOOL, _NUMBER, _SIZE, _STRING = "bool", "number", "size", "string"
#: file-posix's creation options, which qemu-img appends to every format's list.
_FILE_OPTIONS: Final = {
    "size": _SIZE,
    "preallocation": _STRING,
    "nocow": _BOOL,
    "extent_size_hint": _SIZE,
}
_CREATE_OPTIONS: Final[dict[str, dict[str, str]]] = {
    "qcow2": {
        "size": _SIZE,
        "compat": _STRING,
        "backing_file": _STRING,
        "backing_fmt": _STRING,
        "data_file": _STRING,
        "data_file_raw": _BOOL,
        "encryption": _BOOL,
        "encrypt.format": _STRING,
        "encrypt.key-secret": _STRING,
        "encrypt.cipher-alg": _STRING,
        "encrypt.cipher-mode": _STRING,
        "encrypt.ivgen-alg": _STRING,
        "encrypt.ivgen-hash-alg": _STRING,
        "encrypt.hash-alg": _STRING,
        "encrypt.iter-time": _NUMBER,
        "cluster_size": _SIZE,
        "preallocation": _STRING,
        "lazy_refcounts": _BOOL,
        "refcount_bits": _NUMBER,
        "compression_type": _STRING,
        "extended_l2": _BOOL,
        **_FILE_OPTIONS,
    },
    "raw": dict(_FILE_OPTIONS),
}
_PREALLOC_MODES: Final = ("off", "metadata", "falloc", "full")


# -- option values --------------------------------------------------------------------------


def _parse_options(out_format: str, options: Mapping[str, str]) -> dict[str, bool | int | str]:
    """Check ``options`` against the output format's creation options, as
    ``qemu_opts_do_parse`` does: unknown names and badly typed values are refused."""
    declared = _CREATE_OPTIONS[out_format]
    parsed: dict[str, bool | int | str] = {}
    for key, value in options.items():
        kind = declared.get(key)
        if kind is None:
            raise InvalidArgument(
                f"Invalid parameter '{key}' (invalid options for file format '{out_format}')"
            )
        if kind == _BOOL:
            parsed[key] = parse_option_bool(key, value)
        elif kind == _NUMBER:
            parsed[key] = parse_option_number(key, value)
        elif kind == _SIZE:
            parsed[key] = parse_option_size(key, value)
        else:
            parsed[key] = value
    return parsed


# -- qcow2 arithmetic -----------------------------------------------------------------------


def calc_prealloc_size(
    total_size: int, cluster_size: int, refcount_order: int, extended_l2: bool
) -> int:
    """Bytes of a fully allocated qcow2 image of ``total_size`` (QEMU's
    ``qcow2_calc_prealloc_size``): header, L2 and L1 tables covering every cluster,
    refcount structures for all of it, and the data clusters."""
    aligned_total_size = align_up(total_size, cluster_size)
    l2e_size = 16 if extended_l2 else 8
    meta_size = cluster_size  # the header cluster
    nl2e = align_up(aligned_total_size // cluster_size, cluster_size // l2e_size)
    meta_size += nl2e * l2e_size
    nl1e = align_up(nl2e * l2e_size // cluster_size, cluster_size // _L1E_SIZE)
    meta_size += nl1e * _L1E_SIZE
    # qcow2_refcount_metadata_size without the generous increase: the same fixed point
    # as the layout planner's.
    table, blocks = refcount_clusters(
        (meta_size + aligned_total_size) // cluster_size,
        cluster_size.bit_length() - 1,
        refcount_order,
    )
    meta_size += (table + blocks) * cluster_size
    return meta_size + aligned_total_size


def bitmaps_size(disk: Disk, cluster_size: int) -> int:
    """Bytes the persistent dirty bitmaps of ``disk`` (its top image only) need in a qcow2
    image with ``cluster_size`` (QEMU's ``qcow2_get_persistent_dirty_bitmap_size``).

    Every bitmap is assumed fully allocated, plus its bitmap table, plus the directory.
    """
    total = 0
    directory = 0
    for bm in disk.persistent_bitmaps():
        bits = div_round_up(disk.virtual_size, bm.granularity)
        clusters = div_round_up(div_round_up(bits, 8), cluster_size)
        total += clusters * cluster_size
        total += align_up(clusters * _BITMAP_TABLE_ENTRY_SIZE, cluster_size)
        directory += align_up(_BITMAP_DIR_ENTRY_SIZE + len(bm.name.encode()), 8)
    return total + align_up(directory, cluster_size)


def _counts(ext: Extent) -> bool:
    """Whether qemu's block status for this run is allocated data, not zero."""
    if ext.kind is ExtentKind.COMPRESSED:
        return True
    return ext.kind is ExtentKind.DATA and not ext.hole


def allocated_clusters(extents: Iterable[Extent], cluster_size: int) -> int:
    """Clusters of ``cluster_size`` touched by data in resolved, ordered ``extents``.

    qemu-img walks block status and, on a data run, counts from the start of its first
    cluster to the end of its last, then resumes at that cluster boundary; the result is
    the number of output clusters that contain any data.
    """
    count = 0
    counted_until = 0  # first cluster index not yet counted
    for ext in extents:
        if ext.length == 0 or not _counts(ext):
            continue
        first = max(ext.start // cluster_size, counted_until)
        last = div_round_up(ext.end, cluster_size)
        if last > first:
            count += last - first
            counted_until = last
    return count


def _measure_qcow2(opts: Mapping[str, bool | int | str], disk: Disk | None) -> dict[str, int]:
    """QEMU's ``qcow2_measure``; the checks run in its order, with its messages."""
    extended_l2 = bool(opts.get("extended_l2", False))
    cluster_size = int(opts.get("cluster_size", DEFAULT_CLUSTER_SIZE))
    cs = cluster_size
    if (
        cs <= 0
        or cs & (cs - 1)
        or not (1 << hdr.MIN_CLUSTER_BITS) <= cs <= (1 << hdr.MAX_CLUSTER_BITS)
    ):
        raise InvalidArgument("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cs < _MIN_EXTL2_CLUSTER_SIZE:
        raise InvalidArgument(
            "Extended L2 entries are only supported with cluster sizes of at least "
            f"{_MIN_EXTL2_CLUSTER_SIZE} bytes"
        )
    compat = opts.get("compat")
    if compat is None or compat == "1.1":
        version = 3
    elif compat == "0.10":
        version = 2
    else:
        raise InvalidArgument(f"Invalid compatibility level: '{compat}'")
    refcount_bits = int(opts.get("refcount_bits", 16))
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise InvalidArgument(
            "Different refcount widths than 16 bits require compatibility level 1.1 or "
            "above (use compat=1.1 or greater)"
        )
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in _PREALLOC_MODES:
        raise InvalidArgument(f"invalid parameter value: {prealloc}")
    # Presence is what counts: ``backing_file=`` names a backing file too.
    has_backing_file = "backing_file" in opts
    if opts.get("encrypt.format") == "luks":
        raise UnsupportedFeature("measuring LUKS-encrypted qcow2 output is not supported")

    virtual_size = align_up(int(opts.get("size", 0)), cs)
    l2e_size = 16 if extended_l2 else 8
    l2_tables = div_round_up(virtual_size // cs, cs // l2e_size)
    if l2_tables * _L1E_SIZE > hdr.MAX_L1_SIZE_BYTES:
        raise InvalidArgument("The image size is too large (try using a larger cluster size)")

    required = 0
    if disk is not None:
        source_size = disk.virtual_size
        virtual_size = align_up(source_size, cs)
        if has_backing_file or prealloc in ("full", "falloc"):
            # With a backing file qemu cannot know what the chains share and assumes
            # every cluster will be written; full preallocation writes them all anyway.
            required = virtual_size
        else:
            required = allocated_clusters(disk.extents(), cs) * cs
    if prealloc in ("full", "falloc"):
        required = virtual_size

    fully_allocated = calc_prealloc_size(
        virtual_size, cs, refcount_bits.bit_length() - 1, extended_l2
    )
    result: dict[str, int] = {}
    # Bitmaps are shown only when both the source and the output could hold them.  The
    # key comes first, as qemu-img's JSON output orders it.
    if version >= 3 and disk is not None and disk.supports_persistent_bitmaps:
        result["bitmaps"] = bitmaps_size(disk, cs)
    result["required"] = fully_allocated - virtual_size + required
    result["fully-allocated"] = fully_allocated
    return result


def _measure_raw(opts: Mapping[str, bool | int | str], disk: Disk | None) -> dict[str, int]:
    """QEMU's ``raw_measure``: every byte of the virtual disk is in the file."""
    if disk is not None:
        required = disk.virtual_size
    else:
        required = align_up(int(opts.get("size", 0)), _SECTOR)
    return {"required": required, "fully-allocated": required}


def _check_out_format(out_format: str) -> None:
    if out_format in MEASURABLE_FORMATS:
        return
    if out_format in _CREATE_ONLY:
        raise UnsupportedFeature(f"Block driver '{out_format}' does not support size measurement")
    if out_format in _READ_ONLY:
        raise UnsupportedFeature(f"Format driver '{out_format}' does not support image creation")
    raise InvalidArgument(f"Unknown file format '{out_format}'")


def measure_disk(
    disk: Disk | None,
    out_format: str = "qcow2",
    options: Mapping[str, str] | None = None,
    size: int | None = None,
) -> dict[str, int]:
    """Measure an already open source ``disk`` (or, with ``disk`` None, an empty image of
    ``size`` bytes) for ``out_format``; see :func:`measure`."""
    _check_out_format(out_format)
    opts = _parse_options(out_format, options or {})
    if size is not None:
        if size < 0:
            raise InvalidArgument(
                "Invalid image size specified. Must be between 0 and 9223372036854775807."
            )
        opts["size"] = size
    if out_format == "raw":
        return _measure_raw(opts, disk)
    return _measure_qcow2(opts, disk)


def measure(
    src: str | None,
    out_format: str = "qcow2",
    options: Mapping[str, str] | None = None,
    size: int | None = None,
    src_format: str | None = None,
    *,
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> dict[str, int]:
    """The size of a new ``out_format`` image holding ``src``, or an empty one of ``size``.

    Returns qemu-img measure's JSON object: ``required`` (bytes the new image needs for
    the source's data and all metadata), ``fully-allocated`` (bytes with every cluster
    allocated) and, for qcow2 output at compat 1.1 from a qcow2 v3 source, ``bitmaps``
    (bytes its persistent dirty bitmaps would need).  ``options`` are ``-o`` options as
    qemu-img takes them (``cluster_size``, ``compat``, ``refcount_bits``,
    ``extended_l2``, ``preallocation``, ``backing_file``, ...).

    Exactly one of ``src`` and ``size`` must be given.  Raises :class:`InvalidArgument`
    for bad combinations, options or sizes (with qemu-img's wording),
    :class:`UnsupportedFeature` for output formats that cannot be measured, and the
    errors of :func:`qcowlib.formats.opener.open_disk` for a source that cannot be opened
    (``backing_policy`` and ``force_share`` as there).
    """
    if src is None and src_format is not None:
        raise InvalidArgument("--image-opts, -f, and -l require a filename argument.")
    if src is not None and size is not None:
        raise InvalidArgument("--size N cannot be used together with a filename.")
    if src is None and size is None:
        raise InvalidArgument("Either --size N or one filename must be specified.")
    if src is None:
        return measure_disk(None, out_format, options, size)
    from qcowlib.formats.opener import open_disk

    with open_disk(src, src_format, backing_policy, force_share=force_share) as disk:
        return measure_disk(disk, out_format, options, None)


def render_human(result: Mapping[str, int]) -> str:
    """qemu-img measure's human output."""
    text = (
        f"required size: {result['required']}\nfully allocated size: {result['fully-allocated']}\n"
    )
    if "bitmaps" in result:
        text += f"bitmaps size: {result['bitmaps']}\n"
    return text
