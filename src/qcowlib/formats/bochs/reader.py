"""Bochs growing images, read-only (QEMU's ``bochs`` driver).

The header and the catalog are read and checked on open
(:mod:`qcowlib.formats.bochs.codec`).  A read walks the extents it touches: runs of
unallocated extents are filled with zeros at once; an allocated extent is read with one
``pread`` over the range and the sectors whose bitmap bit is clear are zeroed.
``map`` and ``info`` show what qemu-img shows (see :mod:`qcowlib.formats._opaque`).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from qcowlib.core.disk import Extent
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, QcowlibError
from qcowlib.formats._opaque import BlockCache, OpaqueDisk
from qcowlib.formats.bochs import codec as bochs

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

#: Bytes of decoded extent bitmaps kept (one byte per sector of an extent).
BITMAP_CACHE_BYTES = 1 << 20


class BochsDisk(OpaqueDisk):
    """A Bochs growing image opened read-only.

    Raises :class:`qcowlib.errors.FormatError` subclasses for a bad header or catalog
    (see :func:`qcowlib.formats.bochs.codec.parse_header`), and on reads
    :class:`CorruptImage` for a written sector past the end of the file.
    """

    format = "bochs"

    def __init__(self, host: HostFile, filename: str) -> None:
        super().__init__(host, filename)
        try:
            self.header = header = bochs.parse_header(host.pread(0, bochs.HEADER_SIZE), host.size)
            raw = host.pread_exact(header.header, header.extents_used * 4, "bochs catalog")
            self.bases = bochs.decode_catalog(raw, header, host.size)
        except QcowlibError as exc:
            raise exc.with_file(filename) from None
        self.virtual_size = header.virtual_size
        self._bitmaps = BlockCache(BITMAP_CACHE_BYTES)

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        import numpy as np

        size = self.header.extent
        start, end = ext.start, ext.end
        first, last = start // size, (end - 1) // size
        bases = self.bases[first : last + 1]
        # Group extents into runs that are all unallocated or all allocated.
        edges = np.flatnonzero(np.diff((bases < 0).astype(np.int8))) + 1
        bounds = [0, *edges.tolist(), int(bases.size)]
        for a, b in itertools.pairwise(bounds):
            lo = max(start, (first + a) * size)
            hi = min(end, (first + b) * size)
            part = buf[lo - start : hi - start]
            if bases[a] < 0:
                part[:] = bytes(len(part))
                continue
            for index in range(first + a, first + b):
                e_lo = max(lo, index * size)
                e_hi = min(hi, (index + 1) * size)
                self._read_extent(index, e_lo, e_hi, buf[e_lo - start : e_hi - start])

    def _read_extent(self, index: int, lo: int, hi: int, view: memoryview) -> None:
        """Guest bytes ``[lo, hi)`` of allocated extent ``index`` into ``view``."""
        import numpy as np

        h = self.header
        base = int(self.bases[index])
        at = index * h.extent
        bits = self._bitmaps.get(index, self._load_bitmap)
        s0, s1 = (lo - at) // bochs.SECTOR, -(-(hi - at) // bochs.SECTOR)
        seg = np.frombuffer(bits, dtype=np.bool_)[s0:s1]
        data_at = base + h.bitmap_blocks * bochs.SECTOR
        if seg.any():
            last_set = s0 + int(np.flatnonzero(seg)[-1])
            if data_at + (last_set + 1) * bochs.SECTOR > self.host.size:
                raise CorruptImage(
                    f"sector {last_set} of extent {index} is past the end of the file",
                    file=self.filename,
                    structure="bochs extent",
                    offset=data_at + last_set * bochs.SECTOR,
                )
            self.host.pread_into(data_at + (lo - at), view)
        if seg.all():
            return
        edges = np.flatnonzero(np.diff(seg.astype(np.int8))) + 1
        bounds = [0, *edges.tolist(), int(seg.size)]
        for a, b in itertools.pairwise(bounds):
            if seg[a]:
                continue
            z_lo = max(lo, at + (s0 + a) * bochs.SECTOR)
            z_hi = min(hi, at + (s0 + b) * bochs.SECTOR)
            view[z_lo - lo : z_hi - lo] = bytes(z_hi - z_lo)

    def _load_bitmap(self, index: int) -> bytes:
        h = self.header
        raw = self.host.pread(int(self.bases[index]), h.bitmap_used)
        return bochs.sector_bits(raw, h.extent_blocks).tobytes()


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> BochsDisk:
    """The registry's opener."""
    return BochsDisk(host, path)
