"""Parallels expandable images, opened read-only.

The header is read and checked on open (:func:`qcowlib.formats.parallels.codec.parse_header`)
and, when it points at one, the Format Extension cluster is checked as QEMU checks it on
a read-only open (its dirty bitmaps do not change what the disk reads).  The BAT is
read a chunk at a time as the image is mapped or read (``info`` needs only the header).

An image whose ``inuse`` field says it was not closed cleanly reads as it is (QEMU
refuses only to open it read-write); ``check`` reports it.  Like qemu-img, ``info``
shows neither a cluster size nor a dirty flag for this format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcowlib.core.disk import RUN_DATA
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError
from qcowlib.formats._clustermap import MAX_MAP_CLUSTERS, ClusterMap, ClusterMapDisk
from qcowlib.formats._clustermap import read_header as _read_header
from qcowlib.formats.parallels import codec as prl

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy


def read_header(host: HostFile) -> prl.ParallelsHeader:
    """The checked header of a Parallels file."""
    return _read_header(host, prl.HEADER_SIZE, prl.parse_header, "Parallels", prl.HEADER.what)


def read_extension(host: HostFile, h: prl.ParallelsHeader) -> tuple[prl.ParallelsBitmap, ...]:
    """The Format Extension's dirty bitmaps (none without an extension)."""
    if h.ext_off == 0:
        return ()
    at = h.ext_off * prl.SECTOR
    try:
        raw = host.pread_exact(at, h.cluster_size, "parallels format extension")
        return prl.parse_extension(raw, h, at)
    except QcowlibError as exc:
        raise exc.with_file(host.path) from None


class ParallelsDisk(ClusterMapDisk):
    """A Parallels image (one layer).

    Raises :class:`qcowlib.errors.FormatError` subclasses for a bad header, BAT entry or
    Format Extension, and :class:`UnsupportedFeature` for extension features QEMU does
    not read either.
    """

    format = "parallels"

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename
        self.header = read_header(host)
        self.bitmaps = read_extension(host, self.header)
        self.virtual_size = self.header.virtual_size
        self.cluster_size = self.header.cluster_size

    def info_tail(self) -> dict[str, Any]:
        return {}

    def _cluster_map(self, first: int, end: int) -> ClusterMap:
        """BAT entries ``[first, end)`` (at most :data:`MAX_MAP_CLUSTERS`), read from the
        file: QEMU allows a 2 GiB BAT, and checks only the entries a read touches.  Past
        the BAT the disk is not allocated (QEMU ``seek_to_sector``)."""
        import numpy as np

        h = self.header
        if first >= h.bat_entries:
            return ClusterMap.unallocated(first, end)
        lo, hi = first, min(h.bat_entries, end, first + MAX_MAP_CLUSTERS)
        at = prl.HEADER_SIZE + 4 * lo
        raw = self.host.pread_exact(at, 4 * (hi - lo), "parallels bat")
        try:
            bat = prl.decode_bat(raw, hi - lo, at)
            index, host = prl.classify_bat(h, bat, self.host.size, lo)
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
        kind = np.full(index.size, RUN_DATA, dtype=np.uint8)
        return ClusterMap(lo, hi, index, kind, host)


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> ParallelsDisk:
    """The registry's opener."""
    return ParallelsDisk(host, path)
