"""Apple DMG (UDIF) images, read-only (QEMU's ``dmg`` driver).

On open the koly trailer is found where QEMU looks for it, the mish blocks are read
from the resource fork or the XML property list, and the chunk table is built and
checked (:mod:`qcowlib.formats.dmg.codec`).  A read finds the chunks it touches with a
binary search; zero and ignore chunks fill zeros, raw chunks are read in place, zlib and
bzip2 chunks are inflated (bounded, see :mod:`qcowlib.formats._inflate`) and kept in a
small cache.  ADC and LZFSE chunks, and sectors no chunk covers, fail the read with a
:class:`QcowlibError` naming them (QEMU fails those reads with an I/O error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qcowlib.core.disk import Extent
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, QcowlibError, TruncatedImage, UnsupportedFeature
from qcowlib.formats._inflate import inflate_bzip2, inflate_zlib
from qcowlib.formats._opaque import BlockCache, OpaqueDisk
from qcowlib.formats.dmg import codec as dmg
from qcowlib.formats.dmg.resources import blkx_from_plist, blkx_from_rsrc

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

#: Bytes of inflated chunks kept (besides the newest, whatever its size).
CHUNK_CACHE_BYTES = 16 << 20
SECTOR = dmg.SECTOR


def read_table(pread: Callable[[int, int], bytes], size: int) -> tuple[dmg.Koly, dmg.ChunkTable]:
    """The trailer and the checked chunk table of a DMG file of ``size`` bytes.

    ``pread(offset, length)`` returns the file's bytes there (zeros, or fewer bytes,
    past its end); at most 16 MiB are asked for at once (the property list or resource
    fork cap).  Raises :class:`QcowlibError` subclasses as :class:`DmgDisk` documents.
    """
    if size < dmg.KOLY_SIZE:
        raise TruncatedImage("dmg file must be at least 512 bytes long", structure="dmg koly")
    start, length = dmg.koly_window(size)
    at = dmg.find_koly(pread(start, length), start)
    koly = dmg.parse_koly(pread(at, dmg.KOLY_SIZE).ljust(dmg.KOLY_SIZE, b"\0"), at)
    if koly.rsrc_fork_length:
        fork = pread(koly.rsrc_fork_offset, koly.rsrc_fork_length)
        blocks = blkx_from_rsrc(fork, koly.rsrc_fork_offset)
    else:
        blocks = blkx_from_plist(pread(koly.xml_offset, koly.xml_length))
    mishes = [dmg.decode_mish(b, i, koly.data_fork_offset) for i, b in enumerate(blocks)]
    table = dmg.build_table([m for m in mishes if m is not None], koly, size)
    return koly, table


class DmgDisk(OpaqueDisk):
    """A DMG image opened read-only.

    Raises :class:`qcowlib.errors.FormatError` subclasses for a missing or bad trailer,
    property list, resource fork or chunk table; reads raise :class:`CorruptImage` for a
    chunk that does not decode to its size or a sector no chunk covers, and
    :class:`UnsupportedFeature` for ADC and LZFSE chunks.
    """

    format = "dmg"

    def __init__(self, host: HostFile, filename: str) -> None:
        super().__init__(host, filename)
        try:
            self.koly, self.table = read_table(host.pread, host.size)
        except QcowlibError as exc:
            raise exc.with_file(filename) from None
        self.virtual_size = self.koly.virtual_size
        self._chunks = BlockCache(CHUNK_CACHE_BYTES)

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        import numpy as np

        t = self.table
        pos = ext.start
        i = int(np.searchsorted(t.sector, pos // SECTOR, side="right")) - 1
        while pos < ext.end:
            sector = pos // SECTOR
            if i < 0 or sector >= int(t.sector[i]) + int(t.sectors[i]):
                i += 1
                if i >= t.type.size or int(t.sector[i]) > sector:
                    raise CorruptImage(
                        f"no chunk of the image holds sector {sector}",
                        file=self.filename,
                        structure="dmg chunk table",
                    )
            at = int(t.sector[i]) * SECTOR
            stop = min(ext.end, at + int(t.sectors[i]) * SECTOR)
            self._read_chunk(i, pos - at, buf[pos - ext.start : stop - ext.start])
            pos = stop

    def _read_chunk(self, i: int, skip: int, view: memoryview) -> None:
        """Bytes ``[skip, skip + len(view))`` of chunk ``i`` into ``view``."""
        kind = int(self.table.type[i])
        if kind in dmg.ZERO_TYPES:
            view[:] = bytes(len(view))
        elif kind == dmg.UDRW:
            self._check_raw(i)
            self.host.pread_into(int(self.table.offset[i]) + skip, view)
        elif kind in (dmg.UDZO, dmg.UDBZ):
            data = self._chunks.get(i, self._inflate)
            view[:] = data[skip : skip + len(view)]
        else:
            raise UnsupportedFeature(
                f"DMG chunk type {dmg.CHUNK_NAMES.get(kind, hex(kind))} ({kind:#x}) at "
                f"sector {int(self.table.sector[i])} is not supported",
                file=self.filename,
                structure="dmg chunk table",
            )

    def _check_raw(self, i: int) -> None:
        count, length = int(self.table.declared[i]), int(self.table.length[i])
        if length < count * SECTOR:
            raise CorruptImage(
                f"raw chunk at sector {int(self.table.sector[i])} holds {length} bytes for "
                f"{count} sectors",
                file=self.filename,
                structure="dmg chunk table",
                offset=int(self.table.offset[i]),
            )

    def _inflate(self, i: int) -> bytes:
        t = self.table
        offset, length = int(t.offset[i]), int(t.length[i])
        size = int(t.declared[i]) * SECTOR
        raw = self.host.pread(offset, length)
        inflate = inflate_zlib if int(t.type[i]) == dmg.UDZO else inflate_bzip2
        try:
            return inflate(raw, size, f"dmg chunk at sector {int(t.sector[i])}", offset)
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> DmgDisk:
    """The registry's opener."""
    return DmgDisk(host, path)
