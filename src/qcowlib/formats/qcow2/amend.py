"""``amend`` for qcow2: change compat, refcount width, lazy refcounts, backing file and
size of an existing image in place (QEMU's ``qcow2_amend_options``).

The steps run in QEMU's order (upgrade first, so that later steps may need v3; then the
refcount width, the backing file, lazy refcounts and the size; downgrade last, once the
features v2 cannot hold are gone), each on a freshly opened image, and refuse what
qemu-img refuses, with its messages.  A downgrade to compat=0.10 turns zero clusters
into data clusters of zeros (or unallocated ones where nothing shows through), as
``qcow2_expand_zero_clusters`` does; unlike qemu-img it also frees persistent bitmaps
(which v2 cannot keep) instead of leaking their clusters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.core import interrupt
from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats.qcow2 import extensions as hext
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import tables
from qcowlib.formats.qcow2.hostio import with_backing

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.writer import Qcow2RWDisk

__all__ = ["AMEND", "AmendPlan", "amend", "parse_amend_options"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

#: Options qemu-img amend takes for qcow2 that qcowlib changes.
AMEND_OPTIONS: Final = (
    "compat",
    "lazy_refcounts",
    "refcount_bits",
    "backing_file",
    "backing_fmt",
    "size",
)
#: ``-o help``: qemu-img's lines for the options qcowlib changes (name, type, help).
AMEND_HELP: Final = (
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
)
#: Options qemu-img amend knows for qcow2 but qcowlib cannot change yet.
UNSUPPORTED: Final = ("data_file", "data_file_raw", "encrypt.format", "encryption")
#: Creation options that amend refuses, with qemu-img's hint.
CREATE_ONLY: Final = (
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "nocow",
)


@dataclass(frozen=True)
class AmendPlan:
    """What to change (None: leave as it is)."""

    version: int | None = None
    lazy_refcounts: bool | None = None
    refcount_order: int | None = None
    backing_file: str | None = None
    backing_fmt: str | None = None
    size: int | None = None


def _bool(key: str, value: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise InvalidArgument(f"Parameter '{key}' expects 'on' or 'off'")


def parse_amend_options(options: Mapping[str, str]) -> AmendPlan:
    """``-o`` options to a plan; raises :class:`InvalidArgument` with qemu-img's words."""
    from qcowlib._units import parse_size

    if not options:
        raise InvalidArgument("Must specify options (-o)")
    for key in options:
        if key in CREATE_ONLY:
            raise InvalidArgument(
                f"Invalid parameter '{key}'\nThis option is only supported for image creation"
            )
        if key in UNSUPPORTED:
            raise UnsupportedFeature(f"amend -o {key} is not supported by qcowlib")
        if key not in AMEND_OPTIONS:
            raise InvalidArgument(f"Invalid parameter '{key}'")
    version = None
    if "compat" in options:
        compat = options["compat"]
        if compat in ("0.10", "v2"):
            version = 2
        elif compat in ("1.1", "v3"):
            version = 3
        else:
            raise InvalidArgument(f"Unknown compatibility level {compat}")
    order = None
    if "refcount_bits" in options:
        try:
            bits = int(options["refcount_bits"])
        except ValueError:
            bits = 0
        if bits <= 0 or bits > 64 or bits & (bits - 1):
            raise InvalidArgument(
                "Refcount width must be a power of two and may not exceed 64 bits"
            )
        order = bits.bit_length() - 1
    return AmendPlan(
        version=version,
        lazy_refcounts=(
            _bool("lazy_refcounts", options["lazy_refcounts"])
            if "lazy_refcounts" in options
            else None
        ),
        refcount_order=order,
        backing_file=options.get("backing_file"),
        backing_fmt=options.get("backing_fmt"),
        size=parse_size(options["size"]) if "size" in options else None,
    )


def _refuse(h: hdr.Header, plan: AmendPlan) -> None:
    """qemu-img's refusals that need only the header, before anything is written."""
    version = plan.version or h.version
    order = plan.refcount_order if plan.refcount_order is not None else h.refcount_order
    changes_order = plan.refcount_order is not None and plan.refcount_order != h.refcount_order
    if changes_order and version < 3 and order != 4:
        raise InvalidArgument(
            "Refcount widths other than 16 bits require compatibility level 1.1 or "
            "above (use compat=1.1 or greater)"
        )
    if plan.lazy_refcounts and version < 3:
        raise InvalidArgument(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use compat=1.1 or greater)"
        )
    if version < h.version:
        if order != 4:
            raise UnsupportedFeature("compat=0.10 requires refcount_bits=16")
        if h.has_data_file:
            raise UnsupportedFeature("Cannot downgrade an image with a data file")
        left = h.incompatible_features & ~hdr.INCOMPAT_COMPRESSION
        if left:
            raise UnsupportedFeature(
                f"Cannot downgrade an image with incompatible features {left:#x} set"
            )
    if plan.backing_file and not (plan.backing_fmt or h.backing_format):
        raise InvalidArgument("backing_file needs backing_fmt: a backing format is never guessed")


def amend(path: str, options: Mapping[str, str], progress: Progress | None = None) -> None:
    """Apply ``options`` (qemu-img amend's ``-o``) to the qcow2 image at ``path``.

    Raises :class:`InvalidArgument` / :class:`UnsupportedFeature` for what qemu-img
    refuses (checked before anything is written where the header tells), and the usual
    open errors (:class:`~qcowlib.errors.ImageLocked` when the image is in use).
    """
    from qcowlib.formats.qcow2.writer import open_rw_layer

    plan = parse_amend_options(options)
    with open_rw_layer(path) as disk:
        old = disk.header
        _refuse(old, plan)
        if (plan.version or old.version) < old.version:
            _refuse_snapshots_for_v2(disk)
    steps: list[Callable[[Qcow2RWDisk], None]] = []
    if plan.version and plan.version > old.version:
        steps.append(_upgrade)
    if plan.refcount_order is not None and plan.refcount_order != old.refcount_order:
        steps.append(lambda d: _refcount_order(d, plan.refcount_order or 0))
    if plan.backing_file is not None or plan.backing_fmt is not None:
        steps.append(lambda d: _backing(d, plan))
    if plan.lazy_refcounts is not None and plan.lazy_refcounts != old.lazy_refcounts:
        steps.append(lambda d: _lazy(d, bool(plan.lazy_refcounts)))
    if plan.size is not None and plan.size != old.size:
        steps.append(lambda d: _size(d, plan.size or 0))
    if plan.version and plan.version < old.version:
        steps.append(_downgrade)
    for i, step in enumerate(steps):
        with open_rw_layer(path) as disk:
            step(disk)
        if progress:
            progress(i + 1, len(steps))
        interrupt.checkpoint()  # each step leaves the image whole: a signal may stop here
    if progress and not steps:
        progress(1, 1)


# -- the steps ---------------------------------------------------------------------------------
def _refcount_order(disk: Qcow2RWDisk, order: int) -> None:
    from qcowlib.formats.qcow2.refcount_rewrite import change_refcount_order

    change_refcount_order(disk, order)


def _backing(disk: Qcow2RWDisk, plan: AmendPlan) -> None:
    h = disk.header
    log.warning("changing the backing file with amend is deprecated in qemu-img: use rebase -u")
    name = plan.backing_file if plan.backing_file is not None else h.backing_file
    fmt = plan.backing_fmt if plan.backing_fmt is not None else h.backing_format
    disk.set_backing(name or None, fmt if name else None)


def _lazy(disk: Qcow2RWDisk, on: bool) -> None:
    h = disk.header
    features = h.compatible_features
    features = features | hdr.COMPAT_LAZY_REFCOUNTS if on else features & ~hdr.COMPAT_LAZY_REFCOUNTS
    disk.rewrite_header(h.replace(compatible_features=features))


def _size(disk: Qcow2RWDisk, size: int) -> None:
    if disk.header.version == 2 and disk.header.nb_snapshots:
        raise UnsupportedFeature("Can't resize a v2 image which has snapshots")
    disk.resize(size, shrink=True)


def _feature_table_fits(h: hdr.Header, exts: list[hext.HeaderExtension]) -> bool:
    used = 112 + sum(8 + -(-len(e.data) // 8) * 8 for e in exts) + 8
    return used + len(hext.encode_path(h.backing_file or "")) <= h.cluster_size


def _upgrade(disk: Qcow2RWDisk) -> None:
    """compat=0.10 -> 1.1: snapshot entries get the extra data v3 requires, then the
    header becomes a v3 header with the feature name table (as qcow2_update_header)."""
    from qcowlib.formats.qcow2.layout import FEATURE_NAMES
    from qcowlib.formats.qcow2.snapshot_rw import current_entries, write_snapshot_table

    if any(len(sn.extra_data) < 16 for sn in disk.snapshots()):
        write_snapshot_table(disk, current_entries(disk))
    h = disk.header
    exts = [e for e in h.extensions if e.type not in (hext.EXT_FEATURE_TABLE, hext.EXT_BITMAPS)]
    table = hext.feature_table_extension(list(FEATURE_NAMES))
    if _feature_table_fits(h, [*exts, table]):
        exts.append(table)
    new = h.replace(
        version=3,
        header_length=112,
        incompatible_features=0,
        compatible_features=0,
        autoclear_features=0,
        refcount_order=4,
        compression_type=hdr.COMPRESSION_TYPE_ZLIB,
        extensions=tuple(exts),
    )
    disk.rewrite_header(with_backing(new, h.backing_file, h.backing_format))


def _refuse_snapshots_for_v2(disk: Qcow2RWDisk) -> None:
    size = disk.virtual_size
    for sn in disk.snapshots():
        if sn.vm_state_size or (sn.disk_size is not None and sn.disk_size != size):
            raise UnsupportedFeature(
                "Internal snapshots cannot be stored when downgrading to compat=0.10"
            )


def _downgrade(disk: Qcow2RWDisk) -> None:
    """compat=1.1 -> 0.10 (qcow2_downgrade): bitmaps dropped, zero clusters expanded in
    the active and every snapshot's L1 table, then a v2 header."""
    h = disk.header
    if h.bitmaps is not None and h.bitmaps.nb_bitmaps:
        from qcowlib.formats.qcow2.bitmap_rw import remove_all_bitmaps

        remove_all_bitmaps(disk)
        h = disk.header
    if h.compression_type != hdr.COMPRESSION_TYPE_ZLIB:
        _refuse_compressed(disk)
    l1s = [disk.l1] + [
        _snapshot_l1(disk, sn.l1_table_offset, sn.l1_size) for sn in disk.snapshots()
    ]
    for l1 in l1s:
        _expand_zero_clusters(disk, l1)
    disk.flush()
    exts = [e for e in h.extensions if e.type not in (hext.EXT_FEATURE_TABLE, hext.EXT_BITMAPS)]
    new = h.replace(
        version=2,
        header_length=hdr.V2_HEADER_LENGTH,
        incompatible_features=0,
        compatible_features=0,
        autoclear_features=0,
        compression_type=hdr.COMPRESSION_TYPE_ZLIB,
        bitmaps=None,
        extensions=tuple(exts),
    )
    disk.rewrite_header(with_backing(new, h.backing_file, h.backing_format))
    disk.tables_changed()


def _snapshot_l1(disk: Qcow2RWDisk, offset: int, size: int) -> tables.U64:
    raw = disk.host.pread_exact(offset, size * 8, "snapshot L1 table") if size else b""
    return tables.decode_table(raw)


def _l2_tables(disk: Qcow2RWDisk, l1: tables.U64) -> list[int]:
    offs = l1 & np.uint64(tables.OFFSET_MASK)
    return sorted(set(offs[offs != 0].tolist()))


def _refuse_compressed(disk: Qcow2RWDisk) -> None:
    """v2 has no compression type: zstd-compressed clusters would read as garbage."""
    cs = disk.cluster_size
    l1s = [disk.l1] + [
        _snapshot_l1(disk, sn.l1_table_offset, sn.l1_size) for sn in disk.snapshots()
    ]
    for l1 in l1s:
        for off in _l2_tables(disk, l1):
            table = tables.decode_table(disk.host.pread_exact(off, cs, "L2 table"))
            if np.any(table & np.uint64(tables.OFLAG_COMPRESSED)):
                raise UnsupportedFeature(
                    "Cannot downgrade an image with zstd-compressed clusters to compat=0.10"
                )


def _expand_zero_clusters(disk: Qcow2RWDisk, l1: tables.U64) -> None:
    """Zero clusters become data clusters of zeros (unallocated where nothing would
    show through), qcow2_expand_zero_clusters; shared L2 tables count their users."""
    cs = disk.cluster_size
    has_backing = disk.header.backing_file is not None
    zeros = bytes(cs)
    for off in _l2_tables(disk, l1):
        table = tables.decode_table(disk.host.pread_exact(off, cs, "L2 table"))
        flags = table & np.uint64(tables.OFLAG_ZERO | tables.OFLAG_COMPRESSED)
        todo = np.flatnonzero(flags == np.uint64(tables.OFLAG_ZERO))
        if not todo.size:
            continue
        users = disk.allocator.get_refcount(off // cs)
        for i in todo.tolist():
            host = int(table[i]) & tables.OFFSET_MASK
            if not host:
                if not has_backing:
                    table[i] = 0
                    continue
                host = disk.alloc_clusters(1)
                if users > 1:
                    disk.allocator.update([host // cs], users - 1)
            disk.check_overlap(host, cs, None, "data")
            if not disk.host.punch_hole(host, cs):  # as bdrv_pwrite_zeroes: a hole if we can
                disk.host.pwrite(host, zeros)
            single = disk.allocator.get_refcount(host // cs) == 1
            table[i] = host | (tables.OFLAG_COPIED if single else 0)
        disk.flush()
        disk.check_overlap(off, cs, off // cs, "L2 table")
        disk.host.pwrite(off, tables.encode_table(table))
    disk.tables_changed()


class _Amend:
    """The registry's ``amend`` part for qcow2."""

    def run(self, path: str, options: Mapping[str, str], progress: Progress | None = None) -> None:
        amend(path, options, progress)

    def option_help(self) -> str:
        """``amend -o help``, as qemu-img prints it."""
        lines = ["Amend options for 'qcow2':"]
        lines += [f"  {f'{n}=<{t}>':<22} - {h}" for n, t, h in AMEND_HELP]
        return "\n".join(lines) + "\n"


AMEND: Final = _Amend()
