"""A disk as a new VMDK image emitted strictly in file order, its size known up front.

As :class:`qcowlib.formats.qcow2.stream.Qcow2Serializer` does for qcow2: one pass over
the source finds which grains hold data and, for a streamOptimized VMDK, how large each
compressed grain is, which fixes the layout and the exact size; a second pass emits the
bytes in file order.  ``flatten`` writes these to files and to ``-`` (a stream), so both
are the same bytes for the same CID.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from qcowlib.core.disk import Disk
from qcowlib.errors import SourceChanged
from qcowlib.formats.qcow2.stream import STREAM_CHUNK, Pieces
from qcowlib.formats.vmdk import codec as vmdk
from qcowlib.formats.vmdk.output import (
    candidate_grains,
    grain_record_size,
    grains,
    plan_vmdk,
    sparse_tables,
    stream_trailer,
)

Progress = Callable[[int, int], None]
SECTOR = vmdk.SECTOR


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
