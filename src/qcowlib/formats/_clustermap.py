"""Readers of formats that map fixed-size clusters through tables (QED, QCOW, Parallels).

A format describes each cluster of the guest disk with a kind (``RUN_UNALLOCATED``,
``RUN_DATA``, ``RUN_ZERO``, ``RUN_COMPRESSED``) and a host offset, a table (or an L2
table's span) at a time, as numpy arrays; :class:`ClusterMapDisk` turns those arrays
into runs (neighbouring clusters of one kind merge, data clusters only where their host
offsets follow each other, compressed clusters never), then into the
:class:`~qcowlib.core.disk.Extent` objects ``map`` and reads consume.  Data runs are
split where the host file has holes, as ``qemu-img map`` reports them ("data" and
"zero").  The class itself opens nothing: the format hands it an open
:class:`~qcowlib.core.hostfile.HostFile`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import TYPE_CHECKING

from qcowlib.core.disk import (
    RUN_COMPRESSED,
    RUN_DATA,
    RUN_KINDS,
    Disk,
    Extent,
    ExtentKind,
)
from qcowlib.core.hostfile import HostFile

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U8 = npt.NDArray[np.uint8]
    I64 = npt.NDArray[np.int64]

__all__ = ["ClusterMap", "ClusterMapDisk", "cluster_runs"]

#: Clusters a format is asked about at once when it has no natural table span (bounds
#: the arrays built per call).
MAX_CHUNK_CLUSTERS = 1 << 16


class ClusterMap:
    """What a format says of clusters ``[first, first + span)``.

    ``kind`` holds ``RUN_*`` values, ``host`` host offsets (-1: none), ``clen`` the
    compressed length bound of compressed clusters (0 elsewhere).  ``span`` may exceed
    ``len(kind)`` when the last entry is not data: it then stands for all the clusters
    up to ``first + span`` (a whole unallocated table's range in one entry).
    """

    __slots__ = ("clen", "first", "host", "kind", "span")

    def __init__(
        self, first: int, kind: U8, host: I64, clen: I64 | None = None, span: int | None = None
    ) -> None:
        import numpy as np

        self.first = first
        self.kind = kind
        self.host = host
        self.clen = clen if clen is not None else np.zeros(kind.size, dtype=np.int64)
        self.span = int(kind.size) if span is None else span

    @classmethod
    def unallocated(cls, first: int, span: int) -> ClusterMap:
        """Clusters ``[first, first + span)``, none of them allocated."""
        import numpy as np

        from qcowlib.core.disk import RUN_UNALLOCATED

        kind = np.full(1, RUN_UNALLOCATED, dtype=np.uint8)
        return cls(first, kind, np.full(1, -1, dtype=np.int64), span=span)


def cluster_runs(cmap: ClusterMap, cluster_size: int) -> tuple[I64, I64]:
    """``(first, count)`` of the runs in ``cmap``: indexes into its arrays where a run
    starts, and how many clusters it has."""
    import numpy as np

    kind = cmap.kind
    n = kind.size
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = np.empty(n, dtype=np.bool_)
    breaks[0] = True
    data = kind[1:] == RUN_DATA
    breaks[1:] = (
        (kind[1:] != kind[:-1])
        | (kind[1:] == RUN_COMPRESSED)
        | (data & (cmap.host[1:] != cmap.host[:-1] + cluster_size))
    )
    first = np.flatnonzero(breaks).astype(np.int64)
    count = np.diff(np.append(first, n)).astype(np.int64)
    return first, count


class ClusterMapDisk(Disk):
    """A read-only layer whose format maps clusters of ``cluster_size`` bytes.

    Subclasses set :attr:`host`, :attr:`filename`, :attr:`virtual_size` and
    :attr:`cluster_size`, and implement :meth:`_cluster_map`.
    """

    host: HostFile
    cluster_size: int

    @abc.abstractmethod
    def _cluster_map(self, first: int, end: int) -> ClusterMap:
        """The clusters ``[first, end')`` for some ``first < end' <= end`` (a format may
        stop early, at a table boundary).  Raises :class:`QcowlibError` for entries that
        cannot be read."""

    def _chunk_end(self, first: int, end: int) -> int:
        """Where a call to :meth:`_cluster_map` from cluster ``first`` should stop."""
        return min(end, first + MAX_CHUNK_CLUSTERS)

    # -- mapping ------------------------------------------------------------------------
    def _runs(self, start: int, end: int) -> Iterator[Extent]:
        """This layer's runs over guest ``[start, end)`` from its tables alone."""
        cs = self.cluster_size
        cluster = start // cs
        last = -(-end // cs)
        pos = start
        while cluster < last:
            cmap = self._cluster_map(cluster, self._chunk_end(cluster, last))
            firsts, counts = cluster_runs(cmap, cs)
            counts[-1] += cmap.span - int(cmap.kind.size)
            for i, count in zip(firsts.tolist(), counts.tolist(), strict=True):
                run_end = min(end, (cmap.first + i + count) * cs)
                yield self._extent(cmap, i, pos, run_end)
                pos = run_end
            cluster += cmap.span

    def _extent(self, cmap: ClusterMap, i: int, pos: int, run_end: int) -> Extent:
        kind = int(cmap.kind[i])
        ek = RUN_KINDS[kind]
        if ek is ExtentKind.DATA:
            host = int(cmap.host[i]) + (pos - (cmap.first + i) * self.cluster_size)
            return Extent(pos, run_end - pos, ek, host_offset=host, file=self.filename)
        if ek is ExtentKind.COMPRESSED:
            return Extent(
                pos,
                run_end - pos,
                ek,
                host_offset=int(cmap.host[i]),
                file=self.filename,
                compressed_length=int(cmap.clen[i]),
            )
        return Extent(pos, run_end - pos, ek)

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        maybe_holes = self.host.allocated < self.host.size
        for ext in self._runs(start, end):
            if ext.kind is ExtentKind.DATA and maybe_holes:
                yield from self._split_holes(ext)
            else:
                yield ext

    def _split_holes(self, ext: Extent) -> Iterator[Extent]:
        assert ext.host_offset is not None
        host = ext.host_offset
        for s, e, is_data in self.host.segments(host, host + ext.length):
            part = ext.clip(ext.start + (s - host), ext.start + (e - host))
            yield part if is_data else part.as_hole()

    # -- reads --------------------------------------------------------------------------
    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        # As Disk.read_into, from the table runs (no hole probing: holes read as zeros).
        view = memoryview(buf).cast("B")
        start, end = self._range(offset, len(view))
        for ext in self._runs(start, end):
            part = view[ext.start - start : ext.end - start]
            if ext.kind is ExtentKind.DATA or ext.kind is ExtentKind.COMPRESSED:
                self._read_layer(ext, part)
            elif ext.kind is ExtentKind.ZERO or self.backing is None:
                part[:] = bytes(len(part))
            else:
                backing = self.backing
                split = min(ext.end, max(ext.start, backing.virtual_size))
                if split > ext.start:
                    backing.read_into(ext.start, part[: split - ext.start])
                if split < ext.end:
                    part[split - ext.start :] = bytes(ext.end - split)

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        assert ext.host_offset is not None
        self.host.pread_into(ext.host_offset, buf)

    def host_file_for(self, ext: Extent) -> HostFile | None:
        return self.host if ext.kind is ExtentKind.DATA else None

    def _close_layer(self) -> None:
        self.host.close()
