"""``measure -O qcow2``: QEMU 7.2's ``qcow2_measure`` with ``qcow2_calc_prealloc_size``
and ``qcow2_refcount_metadata_size`` (block/qcow2.c) and
``qcow2_get_persistent_dirty_bitmap_size`` (block/qcow2-bitmap.c).

``fully-allocated`` is the size of the image with every cluster allocated.  ``required``
is that minus the data clusters the source leaves unallocated or zero (see
:func:`qcowlib.core.measure.allocated_units`).  Metadata is counted as for the fully
allocated image, so ``required`` overestimates a little, exactly as qemu-img does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib._units import align_up, div_round_up
from qcowlib.core.measure import (
    BOOL,
    FILE_OPTIONS,
    NUMBER,
    SIZE,
    STRING,
    OptionValues,
    SizeMeasure,
    allocated_units,
)
from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2.bitmap import BITMAP_DIR_ENTRY_SIZE
from qcowlib.formats.qcow2.layout import DEFAULT_CLUSTER_SIZE, refcount_clusters

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk

__all__ = ["MEASURE", "bitmaps_size", "calc_prealloc_size"]

_L1E_SIZE: Final = 8
#: QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER * (1 << MIN_CLUSTER_BITS).
_MIN_EXTL2_CLUSTER_SIZE: Final = 32 * 512
_BITMAP_TABLE_ENTRY_SIZE: Final = 8
_PREALLOC_MODES: Final = ("off", "metadata", "falloc", "full")
#: qcow2's creation options as QEMU declares them (``qemu-img create -f qcow2 -o help``).
_OPTIONS: Final[dict[str, str]] = {
    "size": SIZE,
    "compat": STRING,
    "backing_file": STRING,
    "backing_fmt": STRING,
    "data_file": STRING,
    "data_file_raw": BOOL,
    "encryption": BOOL,
    "encrypt.format": STRING,
    "encrypt.key-secret": STRING,
    "encrypt.cipher-alg": STRING,
    "encrypt.cipher-mode": STRING,
    "encrypt.ivgen-alg": STRING,
    "encrypt.ivgen-hash-alg": STRING,
    "encrypt.hash-alg": STRING,
    "encrypt.iter-time": NUMBER,
    "cluster_size": SIZE,
    "preallocation": STRING,
    "lazy_refcounts": BOOL,
    "refcount_bits": NUMBER,
    "compression_type": STRING,
    "extended_l2": BOOL,
    **FILE_OPTIONS,
}


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
        directory += align_up(
            BITMAP_DIR_ENTRY_SIZE + len(bm.name.encode("utf-8", "surrogateescape")), 8
        )
    return total + align_up(directory, cluster_size)


class _Settings(NamedTuple):
    """The options ``qcow2_measure`` looks at, checked."""

    cluster_size: int
    extended_l2: bool
    version: int
    refcount_bits: int
    prealloc: str
    has_backing_file: bool


def _cluster_size(opts: OptionValues, extended_l2: bool) -> int:
    cs = int(opts.get("cluster_size", DEFAULT_CLUSTER_SIZE))
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
    return cs


def _settings(opts: OptionValues) -> _Settings:
    """The options, checked in ``qcow2_measure``'s order, with its messages."""
    extended_l2 = bool(opts.get("extended_l2", False))
    cluster_size = _cluster_size(opts, extended_l2)
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
    if opts.get("encrypt.format") == "luks":
        raise UnsupportedFeature("measuring LUKS-encrypted qcow2 output is not supported")
    # Presence is what counts: ``backing_file=`` names a backing file too.
    has_backing_file = "backing_file" in opts
    return _Settings(cluster_size, extended_l2, version, refcount_bits, prealloc, has_backing_file)


def _measure(opts: OptionValues, disk: Disk | None) -> dict[str, int]:
    """QEMU's ``qcow2_measure``; the checks run in its order, with its messages."""
    s = _settings(opts)
    cs = s.cluster_size
    virtual_size = align_up(int(opts.get("size", 0)), cs)
    l2e_size = 16 if s.extended_l2 else 8
    l2_tables = div_round_up(virtual_size // cs, cs // l2e_size)
    if l2_tables * _L1E_SIZE > hdr.MAX_L1_SIZE_BYTES:
        raise InvalidArgument("The image size is too large (try using a larger cluster size)")

    required = 0
    full = s.prealloc in ("full", "falloc")
    if disk is not None:
        virtual_size = align_up(disk.virtual_size, cs)
        if s.has_backing_file or full:
            # With a backing file qemu cannot know what the chains share and assumes
            # every cluster will be written; full preallocation writes them all anyway.
            required = virtual_size
        else:
            required = allocated_units(disk, cs) * cs
    if full:
        required = virtual_size

    fully_allocated = calc_prealloc_size(
        virtual_size, cs, s.refcount_bits.bit_length() - 1, s.extended_l2
    )
    result: dict[str, int] = {}
    # Bitmaps are shown only when both the source and the output could hold them.  The
    # key comes first, as qemu-img's JSON output orders it.
    if s.version >= 3 and disk is not None and disk.supports_persistent_bitmaps:
        result["bitmaps"] = bitmaps_size(disk, cs)
    result["required"] = fully_allocated - virtual_size + required
    result["fully-allocated"] = fully_allocated
    return result


MEASURE: Final = SizeMeasure(_OPTIONS, _measure)
