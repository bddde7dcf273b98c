"""Raw output as an :class:`~qcowlib.core.emit.OutputLayout`: the guest bytes themselves.

Streams (``flatten -O raw -``, uploads) come from :class:`RawLayout` through the one
emitter; zero and unallocated ranges of the chain's map are emitted as zeros without
being read.  Files are written by :func:`qcowlib.core.copy.write_raw`, the emitter's
raw file sink: guest offset is file offset, so it keeps the kernel's fast paths
(``copy_file_range``, reserved ranges with zero blocks punched out) and ``-S``.
"""

from __future__ import annotations

from qcowlib.core.disk import Disk
from qcowlib.core.emit import Record
from qcowlib.core.plan import Chunk, Classifier, candidate_units, data_runs

#: Bytes per unit read for a stream (zero runs of the map are never read).
UNIT = 64 * 1024


class RawLayout:
    """``src``'s guest bytes as an output layout (no metadata)."""

    stage = False
    holes = 0
    data_start = 0

    def __init__(self, src: Disk) -> None:
        self.src = src
        self.unit = UNIT
        self.virtual_size = src.virtual_size
        self._ranges = candidate_units(src, UNIT)

    def ranges(self) -> list[tuple[int, int]]:
        return self._ranges

    def reserved(self) -> int:
        return 0

    def classifier(self) -> Classifier:
        return Classifier(self.src, self.virtual_size, UNIT, sparse=False)

    def begin(self, stream: bool) -> None:
        return None

    def place(self, chunk: Chunk) -> list[Record]:
        u = UNIT
        out: list[Record] = []
        for s, e in data_runs(chunk.kinds):
            start = (chunk.first + s) * u
            end = min((chunk.first + e) * u, self.virtual_size)
            out.append((start, chunk.data[s * u : s * u + end - start]))
        return out

    def early(self) -> list[Record]:
        return []

    def finish(self) -> list[Record]:
        return []

    def size(self) -> int:
        return self.virtual_size
