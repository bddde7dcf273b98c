"""Writing a new VHD ("vpc") image from a source disk (``convert -O vpc``).

The layout is QEMU's (``vpc_co_create`` and ``alloc_block``): a fixed disk is the data
then the footer; a dynamic disk is a footer copy at 0, the dynamic disk header at 512,
the BAT at 1536 (padded to whole sectors), then one 2 MiB block per allocated block,
each preceded by a sector bitmap with every bit set, and the footer at the end.  Blocks
whose source content is all zeros are left unallocated; inside allocated blocks,
all-zero 4 KiB runs are not written (they stay holes in the file).

The size is kept exactly: when the source size is CHS-exact the footer is the one
``qemu-img create`` writes (creator ``qemu``, that geometry); otherwise it is the one
``-o force_size=on`` writes (creator ``qem2``, the largest geometry, ``current_size``
the source size), which QEMU, Hyper-V and qcowlib all size by ``current_size``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import numpy as np

from qcowlib.core.copy import write_raw
from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import aligned_buffer, pwrite_all
from qcowlib.core.zero import is_zero, nonzero_runs
from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError
from qcowlib.formats.vhd import codec as vhd

Progress = Callable[[int, int], None]
SUBFORMATS = ("dynamic", "fixed")
#: Zero runs inside a block shorter than this are written (qemu-img convert's -S default).
SPARSE_SIZE = 4096
_CREATOR_VER = 0x00050003  # Virtual PC 2007, as QEMU writes it
_VERSION = 0x00010000
_FEATURES_RESERVED = 0x2  # the "reserved" feature bit the specification says is always set


def vhd_footer(size: int, disk_type: int, *, timestamp: int | None = None) -> vhd.Footer:
    """The footer of a new image of exactly ``size`` bytes (a multiple of 512).

    Raises :class:`InvalidArgument` for sizes that are not whole sectors or are above
    2040 GiB.
    """
    if size < 0 or size % vhd.SECTOR:
        raise InvalidArgument(f"VHD size {size} is not a multiple of 512")
    try:
        cyls, heads, secs, total = vhd.create_geometry(size)
        force_size = total * vhd.SECTOR != size
        if force_size:
            cyls, heads, secs, total = vhd.create_geometry(size, force_size=True)
    except QcowlibError as exc:
        raise InvalidArgument(f"cannot create a VHD of {size} bytes: {exc.message}") from None
    if timestamp is None:
        timestamp = max(0, int(time.time()) - vhd.VHD_TIMESTAMP_BASE) & 0xFFFFFFFF
    dynamic = disk_type == vhd.VHD_TYPE_DYNAMIC
    return vhd.Footer(
        features=_FEATURES_RESERVED,
        version=_VERSION,
        data_offset=vhd.FOOTER_SIZE if dynamic else vhd.NO_DATA_OFFSET,
        timestamp=timestamp,
        creator_app=b"qem2" if force_size else b"qemu",
        creator_ver=_CREATOR_VER,
        creator_os=b"Wi2k",
        orig_size=size,
        current_size=size,
        cyls=cyls,
        heads=heads,
        secs_per_cyl=secs,
        type=disk_type,
        checksum=0,
        uuid=uuid.uuid4().bytes,
        in_saved_state=0,
    )


def write_vhd(
    src: Disk, fd: int, *, subformat: str = "dynamic", progress: Progress | None = None
) -> int:
    """Write ``src``'s content into ``fd`` (a fresh, empty file) as a new VHD image.

    ``subformat`` is ``"dynamic"`` or ``"fixed"``.  The virtual size is ``src``'s,
    rounded up to whole sectors.  Returns the file size.  Raises
    :class:`InvalidArgument` for a bad subformat or a size above 2040 GiB, and
    :class:`QcowlibIOError` when writing fails.
    """
    if subformat not in SUBFORMATS:
        raise InvalidArgument(f"VHD subformat {subformat!r} is not one of {SUBFORMATS}")
    size = -(-src.virtual_size // vhd.SECTOR) * vhd.SECTOR
    if subformat == "fixed":
        footer = vhd.build_footer(vhd_footer(size, vhd.VHD_TYPE_FIXED))
        write_raw(src, fd, progress=progress)
        _pwrite(fd, footer, size)
        return size + vhd.FOOTER_SIZE
    return _write_dynamic(src, fd, size, progress)


def _pwrite(fd: int, data: memoryview | bytes, offset: int) -> None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as exc:
        raise QcowlibIOError(f"write error: {exc.strerror}", offset=offset) from None


def _candidate_blocks(src: Disk, block_size: int, n_blocks: int) -> np.ndarray:
    """Flags per block: True where the source may hold non-zero data."""
    flags = np.zeros(n_blocks, dtype=np.bool_)
    for ext in src.extents():
        if not ext.reads_zero:
            flags[ext.start // block_size : -(-ext.end // block_size)] = True
    return flags


def _write_dynamic(src: Disk, fd: int, size: int, progress: Progress | None) -> int:
    bs = vhd.DEFAULT_BLOCK_SIZE
    n_blocks = -(-size // bs)
    footer = vhd.build_footer(vhd_footer(size, vhd.VHD_TYPE_DYNAMIC))
    table_offset = vhd.FOOTER_SIZE + vhd.DYNAMIC_HEADER_SIZE
    header = vhd.build_dynamic_header(
        vhd.DynamicHeader(
            data_offset=vhd.NO_DATA_OFFSET,
            table_offset=table_offset,
            version=_VERSION,
            max_table_entries=n_blocks,
            block_size=bs,
            checksum=0,
        )
    )
    bat = np.full(n_blocks, vhd.BAT_UNALLOCATED, dtype=np.uint32)
    bat_bytes = len(vhd.encode_bat(bat))
    bitmap = b"\xff" * vhd.bitmap_size(bs)
    next_free = table_offset + bat_bytes
    view = aligned_buffer(bs)
    src_size = src.virtual_size
    candidates = _candidate_blocks(src, bs, n_blocks)
    for block in np.flatnonzero(candidates):
        start = int(block) * bs
        length = min(bs, src_size - start)
        if length <= 0:
            continue
        part = view[:length]
        src.read_into(start, part)
        if is_zero(part):
            continue
        bat[block] = next_free // vhd.SECTOR
        _pwrite(fd, bitmap, next_free)
        data_at = next_free + len(bitmap)
        for s, e in nonzero_runs(part, SPARSE_SIZE):
            _pwrite(fd, part[s:e], data_at + s)
        next_free = data_at + bs
        if progress:
            progress(start + length, size)
    _pwrite(fd, footer, 0)
    _pwrite(fd, header, vhd.FOOTER_SIZE)
    _pwrite(fd, vhd.encode_bat(bat), table_offset)
    _pwrite(fd, footer, next_free)
    end = next_free + vhd.FOOTER_SIZE
    try:
        os.ftruncate(fd, end)
    except OSError as exc:
        raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None
    if progress:
        progress(size, size)
    return end
