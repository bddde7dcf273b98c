"""A disk as a new VDI image emitted strictly in file order, its size known up front.

As :class:`qcowlib.formats.qcow2.stream.Qcow2Serializer` does for qcow2: one pass over
the source finds which blocks hold data, which fixes the layout and the exact size; a
second pass emits the bytes in file order.  ``flatten`` writes these to files and to
``-`` (a stream), so both are the same bytes for the same identifiers (a VDI's UUIDs are
fresh per image unless given).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np

from qcowlib.core.disk import Disk
from qcowlib.errors import SourceChanged
from qcowlib.formats.qcow2.classify import DATA, Classifier
from qcowlib.formats.qcow2.stream import STREAM_CHUNK, Pieces
from qcowlib.formats.vdi import codec as vdi
from qcowlib.formats.vdi.codec import SECTOR_SIZE as SECTOR
from qcowlib.formats.vdi.output import candidate_blocks

Progress = Callable[[int, int], None]


class VdiSerializer:
    """A disk as a new VDI image (dynamic, or static with every block present)."""

    def __init__(
        self,
        src: Disk,
        *,
        static: bool = False,
        chunk_size: int = STREAM_CHUNK,
        uuid_image: uuid.UUID | None = None,
        uuid_last_snap: uuid.UUID | None = None,
    ) -> None:
        self.src = src
        self.static = static
        self.chunk_size = chunk_size
        size = src.virtual_size
        self.lay = vdi.plan_layout(size)
        self.bs = vdi.DEFAULT_BLOCK_SIZE
        self.ranges = candidate_blocks(src, self.bs)
        parts = []
        clf = Classifier(src, size, self.bs)
        for chunk in clf.chunks(self.ranges):
            parts.append(np.flatnonzero(chunk.kinds == DATA) + chunk.first)
            clf.release(chunk)
        self.data_blocks = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        n = self.lay.blocks_in_image
        if static:
            bmap = np.arange(n, dtype=np.uint32)
            allocated = n
        else:
            bmap = np.full(n, vdi.VDI_UNALLOCATED, dtype=np.uint32)
            allocated = int(self.data_blocks.size)
            bmap[self.data_blocks] = np.arange(allocated, dtype=np.uint32)
        self.bmap = bmap
        self.header = vdi.new_header(
            size,
            static=static,
            blocks_allocated=allocated,
            uuid_image=uuid_image,
            uuid_last_snap=uuid_last_snap,
        )
        #: Exact length of the image in bytes.
        self.size = self.lay.offset_data + allocated * self.bs

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    def chunks(self, progress: Progress | None = None) -> Iterator[bytes]:
        """The whole image in pieces of ``chunk_size`` bytes (the last may be shorter)."""
        out = Pieces(self.chunk_size)
        lay, bs = self.lay, self.bs
        yield from out.add(vdi.build_header(self.header))
        yield from out.zeros(lay.offset_bmap - SECTOR)
        yield from out.add(vdi.encode_block_map(self.bmap))
        written = lay.offset_bmap + len(vdi.encode_block_map(self.bmap))
        yield from out.zeros(lay.offset_data - written)
        written = lay.offset_data
        k = 0
        size = self.src.virtual_size
        clf = Classifier(self.src, size, bs)
        for chunk in clf.chunks(self.ranges):
            try:
                for i in np.flatnonzero(chunk.kinds == DATA).tolist():
                    block = chunk.first + i
                    if k >= self.data_blocks.size or int(self.data_blocks[k]) != block:
                        raise SourceChanged()
                    target = lay.offset_data + int(self.bmap[block]) * bs
                    yield from out.zeros(target - written)
                    yield from out.add(chunk.data[i * bs : (i + 1) * bs])
                    written = target + bs
                    k += 1
            finally:
                clf.release(chunk)
            if progress:
                progress(min(size, chunk.end * bs), size)
        if k != self.data_blocks.size:
            raise SourceChanged()
        yield from out.zeros(self.size - written)
        yield from out.flush()
