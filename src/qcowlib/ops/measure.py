"""``measure``: the file size a new image needs, as ``qemu-img measure`` computes it.

Follows QEMU 7.2's ``img_measure`` (qemu-img.c): ``-o`` options are first checked
against the output format's creation options and their types, then the format's
measure function (its registry entry's ``measure``: ``formats/qcow2/measure.py`` after
``qcow2_measure``, ``formats/raw/measure.py`` after ``raw_measure``) refuses what it
cannot create and sizes the rest.

``fully-allocated`` is the size of the image with every cluster allocated.  ``required``
is that minus the data clusters the source leaves unallocated or zero: a cluster of the
*output* counts when any byte of it is data (or compressed data) anywhere in the source's
chain; zero and unallocated ranges never count (qemu skips ``BDRV_BLOCK_ZERO`` runs, which
is safe because the new image has no backing file).  Metadata is counted as for the fully
allocated image, so ``required`` overestimates a little, exactly as qemu-img does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from qcowlib.core.chain import BackingPolicy
from qcowlib.core.measure import SizeMeasure, parse_options
from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats import registry

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk

__all__ = [
    "measure",
    "measure_disk",
    "render_human",
]

#: QEMU drivers that are no image formats of qcowlib's (protocols, a directory view),
#: with what qemu-img says when asked to measure for them.
_QEMU_CREATE_ONLY: Final = frozenset({"file", "host_device", "nbd"})
_QEMU_READ_ONLY: Final = frozenset({"vvfat"})


def _measurer(out_format: str) -> SizeMeasure:
    """The output format's ``measure`` part, or qemu-img's refusal."""
    entry = registry.by_name(out_format) if out_format in registry.known() else None
    if entry is not None and entry.measure is not None:
        found: SizeMeasure = entry.implementation("measure")
        return found
    if out_format in _QEMU_CREATE_ONLY or (entry is not None and entry.qemu_create):
        raise UnsupportedFeature(f"Block driver '{out_format}' does not support size measurement")
    if out_format in _QEMU_READ_ONLY or entry is not None:
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
    measurer = _measurer(out_format)
    opts = parse_options(out_format, measurer.options, options or {})
    if size is not None:
        if size < 0:
            raise InvalidArgument(
                "Invalid image size specified. Must be between 0 and 9223372036854775807."
            )
        opts["size"] = size
    return measurer.measure(opts, disk)


def measure(
    src: str | os.PathLike[str] | None,
    out_format: str = "raw",
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

    ``out_format`` defaults to raw, as ``qemu-img measure`` and ``qcowlib measure``
    without ``-O``.  Exactly one of ``src`` and ``size`` must be given.  Raises
    :class:`InvalidArgument` for bad combinations, options or sizes (with qemu-img's wording),
    :class:`UnsupportedFeature` for output formats that cannot be measured, and the
    errors of :func:`qcowlib.formats.opener.open_disk` for a source that cannot be opened
    (``backing_policy`` and ``force_share`` as there).
    """
    src = os.fspath(src) if src is not None else None
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
