"""VMDK images of several files: ``monolithicFlat``, ``twoGbMaxExtentFlat`` and
``twoGbMaxExtentSparse`` (``convert``, ``flatten`` to a file, ``create``).

The image is a descriptor file (``dst`` itself) naming its extents, as QEMU's
``vmdk_co_do_create`` lays it out: ``NAME-flat.vmdk`` for monolithicFlat,
``NAME-f001.vmdk``, ``NAME-f002.vmdk``, ... (flat) or ``NAME-s001.vmdk``, ... (sparse) of
2 GiB each (the last holds the rest) for the twoGbMaxExtent subformats.  Each extent is
the guest bytes of its slice of the disk (:class:`qcowlib.core.disk.SliceDisk`) written
by an existing writer: a flat extent is a raw image (:func:`qcowlib.core.copy.write_raw`),
a sparse extent a monolithicSparse :class:`~qcowlib.formats.vmdk.output.VmdkLayout`
without its embedded descriptor (the header still points at an empty descriptor area,
as QEMU's extents do).  All files are written under temporary names and renamed into
place only when every one is complete, the descriptor last
(:func:`qcowlib.core.sinks.atomic_outputs`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from qcowlib.core.disk import SliceDisk
from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.vmdk.driver import VmdkOptions

Progress = Callable[[int, int], None]
SPLIT_SUBFORMATS: Final = ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
#: Guest bytes per extent of the twoGbMaxExtent subformats (QEMU's 2 GiB).
EXTENT_MAX: Final = 2 << 30
SECTOR: Final = 512


def spans(size: int, subformat: str) -> list[tuple[int, int]]:
    """``(start, length)`` of each extent's slice of a disk of ``size`` bytes."""
    if subformat == "monolithicFlat" or size <= EXTENT_MAX:
        return [(0, size)]
    return [(s, min(EXTENT_MAX, size - s)) for s in range(0, size, EXTENT_MAX)]


def extent_names(dst: str, subformat: str, count: int) -> list[str]:
    """The extent file names QEMU gives an image at ``dst`` (its base name, the part
    before the last dot, then ``-flat``, ``-fNNN`` or ``-sNNN``, then that dot on)."""
    base = os.path.basename(dst)
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    else:
        ext = dot + ext
    if subformat == "monolithicFlat":
        return [f"{stem}-flat{ext}"]
    letter = "f" if subformat.endswith("Flat") else "s"
    return [f"{stem}-{letter}{i:03d}{ext}" for i in range(1, count + 1)]


def descriptor(o: VmdkOptions, names: list[str], pieces: list[tuple[int, int]]) -> bytes:
    """The descriptor file of a split image (QEMU's text, a fresh random CID)."""
    from qcowlib.formats.vmdk import codec as vmdk
    from qcowlib.formats.vmdk.output import disk_database

    flat = o.subformat != "twoGbMaxExtentSparse"
    extents: list[tuple[str, int, str, str | None, int | None]] = [
        ("RW", -(-length // SECTOR), "FLAT" if flat else "SPARSE", name, 0 if flat else None)
        for name, (_, length) in zip(names, pieces, strict=True)
    ]
    capacity = sum(e[1] for e in extents)
    return vmdk.build_descriptor(
        create_type=o.subformat,
        extents=extents,
        cid=random.getrandbits(32),
        ddb=disk_database(capacity, o.adapter_type, o.hw_version, o.tools_version),
    )


def _shifted(progress: Progress | None, start: int, total: int) -> Progress | None:
    if progress is None:
        return None

    def report(done: int, _: int) -> None:
        progress(min(total, start + done), total)

    return report


def _write_extent(
    piece: Disk, fd: int, o: VmdkOptions, sparse_size: int, progress: Progress | None
) -> None:
    from qcowlib.core.copy import write_raw
    from qcowlib.core.emit import truncate, write_file
    from qcowlib.core.space import allocate_first_block
    from qcowlib.formats.vmdk.output import VmdkLayout

    if o.subformat == "twoGbMaxExtentSparse":
        layout = VmdkLayout(
            piece,
            adapter_type=o.adapter_type,
            hw_version=o.hw_version,
            zeroed_grain=o.zeroed_grain,
            tools_version=o.tools_version,
            embed_descriptor=False,
        )
        write_file(layout, fd, progress=progress)
        return
    write_raw(piece, fd, sparse_size=sparse_size, progress=progress)
    truncate(fd, -(-piece.virtual_size // SECTOR) * SECTOR)  # whole sectors, as described
    allocate_first_block(fd, piece.virtual_size)  # QEMU's file driver does


def write_split(
    disk: Disk,
    dst: str,
    o: VmdkOptions,
    *,
    sparse_size: int = 4096,
    protect: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> int:
    """Write ``disk`` as a VMDK of subformat ``o.subformat`` (one of
    :data:`SPLIT_SUBFORMATS`): the descriptor at ``dst``, the extents beside it.
    Returns the descriptor's size.  Raises :class:`InvalidArgument` when an extent
    would replace an input or another output, :class:`QcowlibIOError` on write errors.
    """
    from qcowlib.core.hostfile import pwrite_all
    from qcowlib.core.sinks import atomic_outputs

    if o.subformat not in SPLIT_SUBFORMATS:
        raise InvalidArgument(f"VMDK subformat {o.subformat!r} is a single file")
    pieces = spans(disk.virtual_size, o.subformat)
    names = extent_names(dst, o.subformat, len(pieces))
    directory = os.path.dirname(dst)
    paths = [os.path.join(directory, name) for name in names] + [dst]
    text = descriptor(o, names, pieces)
    with atomic_outputs(paths, protect=protect) as fds:
        for fd, (start, length) in zip(fds, pieces, strict=False):
            piece = SliceDisk(disk, start, length)
            part = _shifted(progress, start, disk.virtual_size)
            _write_extent(piece, fd, o, sparse_size, part)
        pwrite_all(fds[-1], text, 0)
    return len(text)
