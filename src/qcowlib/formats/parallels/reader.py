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

from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError, TruncatedImage
from qcowlib.formats._clustermap import MAX_CHUNK_CLUSTERS, ClusterMap, ClusterMapDisk
from qcowlib.formats.parallels import codec as prl

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.formats.parallels.codec import I64, U8


def read_header(host: HostFile) -> prl.ParallelsHeader:
    """The checked header of a Parallels file."""
    if host.size < prl.HEADER_SIZE:
        raise TruncatedImage(
            "Parallels header is truncated", file=host.path, structure="parallels header"
        )
    try:
        return prl.parse_header(host.pread(0, prl.HEADER_SIZE), host.size)
    except QcowlibError as exc:
        raise exc.with_file(host.path) from None


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

    def _bat_map(self, first: int, end: int) -> tuple[U8, I64]:
        """Kinds and host offsets of BAT entries ``[first, end)``, read from the file
        (a chunk at a time: QEMU allows a 2 GiB BAT)."""
        h = self.header
        at = prl.HEADER_SIZE + 4 * first
        raw = self.host.pread_exact(at, 4 * (end - first), "parallels bat")
        try:
            bat = prl.decode_bat_range(raw, end - first, at)
            return prl.classify_bat(h, bat, self.host.size, first)
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None

    def _chunk_end(self, first: int, end: int) -> int:
        n = self.header.bat_entries
        if first >= n:
            return end  # past the BAT: one unallocated run
        return min(end, n, first + MAX_CHUNK_CLUSTERS)

    def _cluster_map(self, first: int, end: int) -> ClusterMap:
        if first >= self.header.bat_entries:
            # Past the BAT the disk is not allocated (QEMU ``seek_to_sector``).
            return ClusterMap.unallocated(first, end - first)
        kind, host = self._bat_map(first, end)
        return ClusterMap(first, kind, host)

    def runs_data_file(self) -> HostFile | None:
        return self.host


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> ParallelsDisk:
    """The registry's opener."""
    return ParallelsDisk(host, path)
