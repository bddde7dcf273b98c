"""The one writer of new VDI images (``convert -O vdi``, ``flatten``, its stream).

The layout is the one QEMU's ``vdi_co_do_create`` writes: the header sector at 0, the
block map at 0x200 padded to a whole sector, then the data area with 1 MiB blocks
(:func:`qcowlib.formats.vdi.codec.plan_layout`).  :class:`VdiLayout` places the data
blocks in guest order and builds the block map and header once they are placed;
:mod:`qcowlib.core.emit` writes it to a file or a stream.

A dynamic image allocates only blocks that hold a non-zero byte; consecutive non-zero
blocks get consecutive block indexes, so each run is one record.  A static image maps
every block to the same index (as QEMU creates it) and has its data area sized by
truncation, so all-zero blocks stay holes in a file (zeros in a stream).  The data area
starts 0x1200 bytes into the file (not on a page), so a file sink stages blocks into
aligned buffers and writes whole pages straight to the disk.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import numpy as np

from qcowlib.core.disk import Disk
from qcowlib.core.emit import Record, write_file
from qcowlib.core.plan import Chunk, Classifier, candidate_units, data_runs
from qcowlib.formats.vdi import codec as vdi

Progress = Callable[[int, int], None]


class VdiLayout:
    """A new VDI image of ``src`` (dynamic, or static with every block present).

    Fresh image and snapshot UUIDs are made once per layout, so its file and its stream
    are the same bytes.  Raises :class:`qcowlib.errors.UnsupportedFeature` when ``src``
    is larger than VDI allows.
    """

    stage = True
    holes = 0

    def __init__(self, src: Disk, *, static: bool = False) -> None:
        self.src = src
        self.static = static
        self.virtual_size = size = src.virtual_size
        self.lay = vdi.plan_layout(size)
        self.unit = vdi.DEFAULT_BLOCK_SIZE
        self.data_start = self.lay.offset_data
        self._ranges = candidate_units(src, self.unit)
        self.uuids = (uuid.uuid4(), uuid.uuid4())
        self.begin(stream=False)

    def ranges(self) -> list[tuple[int, int]]:
        return self._ranges

    def reserved(self) -> int:
        return 0

    def classifier(self) -> Classifier:
        return Classifier(self.src, self.virtual_size, self.unit)

    def begin(self, stream: bool) -> None:
        n = self.lay.blocks_in_image
        if self.static:
            self.bmap = np.arange(n, dtype=np.uint32)
            self.allocated = n
        else:
            self.bmap = np.full(n, vdi.VDI_UNALLOCATED, dtype=np.uint32)
            self.allocated = 0

    def place(self, chunk: Chunk) -> list[Record]:
        bs = self.unit
        out: list[Record] = []
        for s, e in data_runs(chunk.kinds):
            b0 = chunk.first + s
            count = e - s
            if self.static:
                index = b0
            else:
                index = self.allocated
                self.bmap[b0 : b0 + count] = np.arange(index, index + count, dtype=np.uint32)
                self.allocated += count
            out.append((self.data_start + index * bs, chunk.data[s * bs : e * bs]))
        return out

    def early(self) -> list[Record]:
        return []

    def finish(self) -> list[Record]:
        header = vdi.new_header(
            self.virtual_size,
            static=self.static,
            blocks_allocated=self.allocated,
            uuid_image=self.uuids[0],
            uuid_last_snap=self.uuids[1],
        )
        return [
            (0, vdi.build_header(header)),
            (self.lay.offset_bmap, vdi.encode_block_map(self.bmap)),
        ]

    def size(self) -> int:
        return self.data_start + self.allocated * self.unit


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
    return write_file(VdiLayout(src, static=static), fd, progress=progress)
