"""VDI and VMDK images of a disk emitted strictly in file order, size known up front.

As :class:`qcowlib.engine.serialize.Qcow2Serializer` does for qcow2: one pass over the
source classifies it (which VDI blocks or VMDK grains hold data, and for a
streamOptimized VMDK how large each compressed grain is), which fixes the layout and
the exact size; a second pass emits the bytes in file order.  ``flatten`` writes these
to files and to ``-`` (a stream), so both are the same bytes for the same identifiers
(a VDI's UUIDs and a VMDK's CID are fresh per image unless given).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np

from qcowlib.disk.base import Disk
from qcowlib.engine.classify import DATA, Classifier
from qcowlib.engine.serialize import STREAM_CHUNK, Pieces
from qcowlib.engine.vdiout import candidate_blocks
from qcowlib.engine.vmdkout import (
    candidate_grains,
    grain_record_size,
    grains,
    plan_vmdk,
    sparse_tables,
    stream_trailer,
)
from qcowlib.errors import SourceChanged
from qcowlib.formats import vdi, vmdk

Progress = Callable[[int, int], None]
SECTOR = vmdk.SECTOR


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


class VmdkSerializer:
    """A disk as a new monolithicSparse or streamOptimized VMDK."""

    def __init__(
        self,
        src: Disk,
        *,
        subformat: str = "monolithicSparse",
        extent_name: str = "image.vmdk",
        adapter_type: str = "ide",
        hw_version: str = "4",
        cid: int | None = None,
        chunk_size: int = STREAM_CHUNK,
    ) -> None:
        self.src = src
        self.chunk_size = chunk_size
        self.plan = plan = plan_vmdk(
            src.virtual_size,
            subformat=subformat,
            extent_name=extent_name,
            adapter_type=adapter_type,
            hw_version=hw_version,
            cid=cid,
        )
        gb = plan.grain_bytes
        self.ranges = candidate_grains(src, gb)
        index: list[int] = []
        length: list[int] = []
        for grain, payload in grains(src, gb, plan.n_grains, plan.stream, self.ranges):
            index.append(grain)
            length.append(grain_record_size(len(payload)) if plan.stream else gb)
        self.grain_index = np.array(index, dtype=np.int64)
        self.record_length = np.array(length, dtype=np.int64)
        first = plan.grain_offset * SECTOR
        starts = first + np.concatenate(([0], np.cumsum(self.record_length)))
        self.grain_pos = starts[:-1]
        self.gte = np.zeros(plan.n_gt * plan.gtes, dtype=np.uint32)
        self.gte[self.grain_index] = (self.grain_pos // SECTOR).astype(np.uint32)
        data_end = int(starts[-1])
        if plan.stream:
            self.trailer = stream_trailer(plan, self.gte, data_end)
            self.size = data_end + len(self.trailer)
        else:
            self.trailer = b""
            self.size = max(data_end, first)

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    def chunks(self, progress: Progress | None = None) -> Iterator[bytes]:
        """The whole image in pieces of ``chunk_size`` bytes (the last may be shorter)."""
        plan = self.plan
        out = Pieces(self.chunk_size)
        yield from out.add(plan.head)
        written = len(plan.head)
        if not plan.stream:
            tables = sparse_tables(plan, self.gte)
            yield from out.zeros(plan.rgd * SECTOR - written)
            yield from out.add(tables)
            written = plan.rgd * SECTOR + len(tables)
        yield from out.zeros(plan.grain_offset * SECTOR - written)
        written = plan.grain_offset * SECTOR
        gs, gb = plan.grain_size, plan.grain_bytes
        size = self.src.virtual_size
        k = 0
        for grain, payload in grains(self.src, gb, plan.n_grains, plan.stream, self.ranges):
            data = vmdk.build_grain_marker(grain * gs, payload) if plan.stream else payload
            if (
                k >= self.grain_index.size
                or int(self.grain_index[k]) != grain
                or int(self.record_length[k]) != len(data)
            ):
                raise SourceChanged()
            yield from out.add(data)
            written += len(data)
            k += 1
            if progress:
                progress(min(size, (grain + 1) * gb), size)
        if k != self.grain_index.size:
            raise SourceChanged()
        yield from out.add(self.trailer)
        written += len(self.trailer)
        yield from out.zeros(self.size - written)
        yield from out.flush()
