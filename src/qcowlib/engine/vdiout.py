"""Writing a new VDI image from a source disk in one pass (``convert -O vdi``).

The layout is the one QEMU's ``vdi_co_do_create`` writes: the header sector at 0, the
block map at 0x200 padded to a whole sector, then the data area with 1 MiB blocks
(:func:`qcowlib.formats.vdi.plan_layout`).  Data blocks are written first, in guest
order, then the block map, then the header that points at them.

A dynamic image allocates only blocks that hold a non-zero byte; consecutive non-zero
blocks get consecutive block indexes, so each run is one write.  A static image maps
every block to the same index (as QEMU creates it) and has its data area sized by
truncation, so all-zero blocks stay holes in the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from qcowlib.disk._file import pwrite_all
from qcowlib.disk.base import Disk
from qcowlib.engine.zero import nonzero_runs
from qcowlib.errors import QcowlibIOError
from qcowlib.formats import vdi

Progress = Callable[[int, int], None]
#: Blocks read from the source at a time (8 MiB with 1 MiB blocks).
CHUNK_BLOCKS = 8


def candidate_blocks(src: Disk, block_size: int) -> list[tuple[int, int]]:
    """Block ranges ``[first, end)`` of ``src`` that may hold non-zero data."""
    out: list[tuple[int, int]] = []
    for ext in src.extents():
        if ext.reads_zero:
            continue
        first = ext.start // block_size
        end = -(-ext.end // block_size)
        if out and out[-1][1] >= first:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return out


def write_vdi(
    src: Disk,
    fd: int,
    *,
    static: bool = False,
    progress: Progress | None = None,
) -> int:
    """Write ``src``'s guest-visible bytes into ``fd`` (a new, empty file) as a VDI image.

    Fresh image and snapshot UUIDs are generated.  Returns the size of the file.
    Raises :class:`qcowlib.errors.UnsupportedFeature` when ``src`` is larger than VDI
    allows (:data:`qcowlib.formats.vdi.VDI_DISK_SIZE_MAX`) and
    :class:`qcowlib.errors.QcowlibIOError` on write errors; read errors from ``src``
    propagate.
    """
    size = src.virtual_size
    lay = vdi.plan_layout(size)
    bs = vdi.DEFAULT_BLOCK_SIZE
    n = lay.blocks_in_image
    if static:
        bmap = np.arange(n, dtype=np.uint32)
        end = lay.offset_data + n * bs
        _truncate(fd, end)
    else:
        bmap = np.full(n, vdi.VDI_UNALLOCATED, dtype=np.uint32)
    next_index = 0
    buf = bytearray(CHUNK_BLOCKS * bs)
    view = memoryview(buf)
    for first, stop in candidate_blocks(src, bs):
        for block in range(first, stop, CHUNK_BLOCKS):
            nb = min(CHUNK_BLOCKS, stop - block)
            guest = block * bs
            glen = min(size, guest + nb * bs) - guest
            chunk = view[: nb * bs]
            src.read_into(guest, chunk[:glen])
            if glen < len(chunk):
                chunk[glen:] = bytes(len(chunk) - glen)  # the last block, padded
            for s, e in nonzero_runs(chunk, bs):
                b0 = block + s // bs
                count = (e - s) // bs
                if static:
                    index = b0
                else:
                    index = next_index
                    bmap[b0 : b0 + count] = np.arange(index, index + count, dtype=np.uint32)
                    next_index += count
                _pwrite(fd, chunk[s:e], lay.offset_data + index * bs)
            if progress:
                progress(min(size, guest + nb * bs), size)
    allocated = n if static else next_index
    header = vdi.new_header(size, static=static, blocks_allocated=allocated)
    _pwrite(fd, vdi.encode_block_map(bmap), lay.offset_bmap)
    _pwrite(fd, vdi.build_header(header), 0)
    end = lay.offset_data + allocated * bs
    _truncate(fd, end)
    if progress:
        progress(size, size)
    return end


def _pwrite(fd: int, data: memoryview | bytes, offset: int) -> None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as exc:
        raise QcowlibIOError(f"write error: {exc.strerror}", offset=offset) from None


def _truncate(fd: int, end: int) -> None:
    try:
        os.ftruncate(fd, end)
    except OSError as exc:
        raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None
