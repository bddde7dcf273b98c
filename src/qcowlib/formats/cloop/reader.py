"""cloop V2.0 images, read-only (QEMU's ``cloop`` driver).

The header and the offsets table are read and checked on open
(:mod:`qcowlib.formats.cloop.codec`); a read inflates each block it touches (bounded:
a block that inflates to anything but ``block_size`` bytes is refused, see
:mod:`qcowlib.formats._inflate`) and keeps the last few in a cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.core.disk import Extent
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError
from qcowlib.formats._inflate import inflate_zlib
from qcowlib.formats._opaque import BlockCache, OpaqueDisk
from qcowlib.formats.cloop import codec as cloop

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

#: Bytes of inflated blocks kept (besides the newest, whatever its size).
BLOCK_CACHE_BYTES = 16 << 20


class CloopDisk(OpaqueDisk):
    """A cloop image opened read-only.

    Raises :class:`qcowlib.errors.FormatError` subclasses for a bad header or offsets
    table (see :mod:`qcowlib.formats.cloop.codec`), and on reads
    :class:`~qcowlib.errors.CorruptImage` for a block that does not inflate to its size.
    """

    format = "cloop"

    def __init__(self, host: HostFile, filename: str) -> None:
        super().__init__(host, filename)
        try:
            self.header = header = cloop.parse_header(host.pread(0, cloop.OFFSETS_AT), host.size)
            raw = host.pread_exact(cloop.OFFSETS_AT, header.offsets_size, "cloop offsets")
            self.offsets = cloop.decode_offsets(raw, header, host.size)
        except QcowlibError as exc:
            raise exc.with_file(filename) from None
        self.virtual_size = header.virtual_size
        self._blocks = BlockCache(BLOCK_CACHE_BYTES)

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        size = self.header.block_size
        pos = ext.start
        while pos < ext.end:
            block = pos // size
            at = block * size
            stop = min(ext.end, at + size)
            data = self._blocks.get(block, self._inflate)
            buf[pos - ext.start : stop - ext.start] = data[pos - at : stop - at]
            pos = stop

    def _inflate(self, block: int) -> bytes:
        start = int(self.offsets[block])
        end = int(self.offsets[block + 1])
        raw = self.host.pread(start, end - start)
        try:
            return inflate_zlib(raw, self.header.block_size, f"cloop block {block}", start)
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> CloopDisk:
    """The registry's opener."""
    return CloopDisk(host, path)
