"""Writing a new VDI image from a source disk in one pass (``convert -O vdi``).

The layout is the one QEMU's ``vdi_co_do_create`` writes: the header sector at 0, the
block map at 0x200 padded to a whole sector, then the data area with 1 MiB blocks
(:func:`qcowlib.formats.vdi.codec.plan_layout`).  Data blocks are written first, in guest
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
import numpy.typing as npt

from qcowlib.core.appendsink import AppendWriter
from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import DataWriter, pwrite_all
from qcowlib.core.pipeline import TaskQueue
from qcowlib.core.runs import RunSource
from qcowlib.errors import QcowlibIOError
from qcowlib.formats.qcow2.classify import DATA, Classifier
from qcowlib.formats.vdi import codec as vdi

Progress = Callable[[int, int], None]


def candidate_blocks(src: Disk, block_size: int) -> list[tuple[int, int]]:
    """Block ranges ``[first, end)`` of ``src`` that may hold non-zero data."""
    first, end = RunSource(src).nonzero_units(block_size)
    return list(zip(first.tolist(), end.tolist(), strict=True))


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
    allows (:data:`qcowlib.formats.vdi.codec.VDI_DISK_SIZE_MAX`) and
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
    # Blocks are read and scanned for zeros by worker threads, in guest order, while
    # this thread assigns block indexes.  The data area starts 0x1200 bytes into the
    # file (not on a page), so blocks are staged into aligned buffers and written from
    # there (:class:`AppendWriter`): whole pages straight to the disk.
    clf = Classifier(src, size, bs)
    sink = DataWriter(fd)
    try:
        with TaskQueue(2, 4, name="qcowlib-write") as tasks:
            out = AppendWriter(sink, tasks, lay.offset_data)
            for chunk in clf.chunks(candidate_blocks(src, bs)):
                try:
                    for s, e in _data_runs(chunk.kinds):
                        b0 = chunk.first + s
                        count = e - s
                        if static:
                            index = b0
                        else:
                            index = next_index
                            bmap[b0 : b0 + count] = np.arange(index, index + count, dtype=np.uint32)
                            next_index += count
                        out.skip_to(lay.offset_data + index * bs)
                        out.append(chunk.data[s * bs : e * bs])
                finally:
                    clf.release(chunk)
                if progress:
                    progress(min(size, chunk.end * bs), size)
            out.close()
    finally:
        sink.close()
    allocated = n if static else next_index
    header = vdi.new_header(size, static=static, blocks_allocated=allocated)
    _pwrite(fd, vdi.encode_block_map(bmap), lay.offset_bmap)
    _pwrite(fd, vdi.build_header(header), 0)
    end = lay.offset_data + allocated * bs
    _truncate(fd, end)
    if progress:
        progress(size, size)
    return end


def _data_runs(kinds: npt.NDArray[np.uint8]) -> list[tuple[int, int]]:
    """``[start, end)`` index runs of DATA entries in ``kinds``."""
    flags = np.concatenate(([False], kinds == DATA, [False]))
    edges = np.flatnonzero(flags[1:] != flags[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


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
