"""Readers of formats that map fixed-size clusters through tables (QED, QCOW, Parallels).

A format describes the clusters of a range of the guest disk as a :class:`ClusterMap`:
numpy arrays of the clusters it has something to say about (their numbers, kinds
``RUN_DATA``, ``RUN_ZERO`` or ``RUN_COMPRESSED``, host offsets and compressed lengths),
decoded a table (or many tables) at a time; every cluster it does not list is
unallocated.  :func:`cluster_runs` turns that into sorted runs with array operations
(neighbouring clusters of one kind merge, data clusters only where their host offsets
follow each other, compressed clusters never), and :class:`ClusterMapDisk` hands them
to the engine as :class:`~qcowlib.core.disk.Runs` (``layer_runs``), which copying,
mapping, checksumming and reading all consume: no Python work per cluster, nor per run
until a read has to issue one ``pread`` per run.

The class opens nothing: the format hands it an open
:class:`~qcowlib.core.hostfile.HostFile`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from qcowlib.core.disk import (
    RUN_COMPRESSED,
    RUN_DATA,
    RUN_KINDS,
    RUN_UNALLOCATED,
    RUN_ZERO,
    Disk,
    Extent,
    ExtentKind,
    Runs,
)
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError, TruncatedImage

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U8 = npt.NDArray[np.uint8]
    I64 = npt.NDArray[np.int64]
    #: Run arrays in guest bytes: start, length, kind, host (-1: none), compressed length.
    RunArrays = tuple[I64, I64, U8, I64, I64]

__all__ = [
    "ClusterMap",
    "ClusterMapDisk",
    "cluster_runs",
    "read_backing_name",
    "read_header",
    "read_tables",
]

H = TypeVar("H")

#: Clusters a format decodes per call at most (bounds the arrays built at once:
#: about 25 bytes a cluster, so 32 MiB).
MAX_MAP_CLUSTERS = 1 << 20
#: Consecutive tables are read with one ``pread`` up to this many bytes.
MAX_TABLE_READ = 4 << 20


# -- I/O shared by the readers ------------------------------------------------------------
def read_header(
    host: HostFile, size: int, parse: Callable[[bytes, int], H], name: str, structure: str
) -> H:
    """``parse(first size bytes, file size)``: a format's checked header.

    Raises :class:`TruncatedImage` ("NAME header is truncated") for a shorter file and
    whatever ``parse`` raises, each naming the file.
    """
    if host.size < size:
        raise TruncatedImage(f"{name} header is truncated", file=host.path, structure=structure)
    try:
        return parse(host.pread(0, size), host.size)
    except QcowlibError as exc:
        raise exc.with_file(host.path) from None


def read_backing_name(host: HostFile, offset: int, size: int) -> str:
    """The backing file name stored at ``offset`` (``size`` bytes, checked by the codec
    against its cap; a name past the end of the file reads short, as QEMU's does)."""
    from qcowlib.formats._clustercodec import decode_backing_name

    return decode_backing_name(host.pread(offset, size))


def read_tables(host: HostFile, offsets: Sequence[int], size: int, what: str) -> bytearray:
    """The tables of ``size`` bytes at ``offsets`` (each checked to lie in the file by
    the caller), one after another in one buffer; tables that follow each other in the
    file are read with one ``pread``."""
    buf = bytearray(len(offsets) * size)
    view = memoryview(buf)
    i = 0
    while i < len(offsets):
        j = i + 1
        while (
            j < len(offsets)
            and offsets[j] == offsets[j - 1] + size
            and (j - i + 1) * size <= MAX_TABLE_READ
        ):
            j += 1
        host.pread_into(offsets[i], view[i * size : j * size])
        i = j
    return buf


# -- cluster maps and runs (pure) ---------------------------------------------------------
class ClusterMap:
    """What a format says of clusters ``[first, end)``.

    ``index`` holds ascending cluster numbers inside the range, ``kind`` their
    ``RUN_*`` values, ``host`` their host offsets (-1: none), ``clen`` the compressed
    length bound of compressed clusters (0 elsewhere).  A cluster not listed, or listed
    as ``RUN_UNALLOCATED``, is unallocated.
    """

    __slots__ = ("clen", "end", "first", "host", "index", "kind")

    def __init__(
        self,
        first: int,
        end: int,
        index: I64,
        kind: U8,
        host: I64,
        clen: I64 | None = None,
    ) -> None:
        import numpy as np

        self.first, self.end = first, end
        self.index, self.kind, self.host = index, kind, host
        self.clen = clen if clen is not None else np.zeros(kind.size, dtype=np.int64)

    @classmethod
    def unallocated(cls, first: int, end: int) -> ClusterMap:
        """Clusters ``[first, end)``, none of them allocated."""
        import numpy as np

        empty = np.zeros(0, dtype=np.int64)
        return cls(first, end, empty, np.zeros(0, dtype=np.uint8), empty, empty)

    @classmethod
    def dense(cls, first: int, kind: U8, host: I64, clen: I64 | None = None) -> ClusterMap:
        """Clusters ``[first, first + len(kind))``, one entry each."""
        import numpy as np

        index = np.arange(first, first + kind.size, dtype=np.int64)
        return cls(first, first + int(kind.size), index, kind, host, clen)

    def within(self, first: int, end: int) -> ClusterMap:
        """The part of this map over ``[first, end)`` (inside ``[self.first, self.end)``)."""
        import numpy as np

        a, b = np.searchsorted(self.index, (first, end))
        return ClusterMap(
            first, end, self.index[a:b], self.kind[a:b], self.host[a:b], self.clen[a:b]
        )


def cluster_runs(cmap: ClusterMap, cluster_size: int) -> tuple[I64, I64, U8, I64, I64]:
    """The runs of ``cmap``, in clusters: ``(first, count, kind, host, clen)``.

    They cover ``[cmap.first, cmap.end)`` in order with no gaps, and no two neighbours
    could merge: unallocated clusters (listed or not) form one run, zero clusters
    likewise, data clusters where their host offsets follow each other; a compressed
    cluster is a run of its own.  ``host`` and ``clen`` are the first cluster's.
    """
    import numpy as np

    keep = cmap.kind != RUN_UNALLOCATED
    index, kind, host, clen = cmap.index[keep], cmap.kind[keep], cmap.host[keep], cmap.clen[keep]
    n = index.size
    if n == 0:
        return _runs_of(np.array([cmap.first]), np.array([cmap.end - cmap.first]))
    breaks = np.empty(n, dtype=np.bool_)
    breaks[0] = True
    breaks[1:] = (
        (index[1:] != index[:-1] + 1)
        | (kind[1:] != kind[:-1])
        | (kind[1:] == RUN_COMPRESSED)
        | ((kind[1:] == RUN_DATA) & (host[1:] != host[:-1] + cluster_size))
    )
    heads = np.flatnonzero(breaks)
    r_first = index[heads]
    r_count = np.diff(np.append(heads, n))
    r_end = r_first + r_count
    # An unallocated gap before a run, and one after the last.
    gap_from = np.concatenate(([cmap.first], r_end[:-1]))
    gap = r_first > gap_from
    tail = int(r_end[-1]) < cmap.end
    slot = np.arange(heads.size) + np.cumsum(gap)
    total = heads.size + int(gap.sum()) + int(tail)
    first = np.empty(total, dtype=np.int64)
    count = np.empty(total, dtype=np.int64)
    kinds = np.full(total, RUN_UNALLOCATED, dtype=np.uint8)
    hosts = np.full(total, -1, dtype=np.int64)
    clens = np.zeros(total, dtype=np.int64)
    first[slot], count[slot], kinds[slot] = r_first, r_count, kind[heads]
    hosts[slot], clens[slot] = host[heads], clen[heads]
    first[slot[gap] - 1] = gap_from[gap]
    count[slot[gap] - 1] = r_first[gap] - gap_from[gap]
    if tail:
        first[-1], count[-1] = r_end[-1], cmap.end - r_end[-1]
    return first, count, kinds, hosts, clens


def _runs_of(first: I64, count: I64) -> tuple[I64, I64, U8, I64, I64]:
    """Unallocated runs ``[first, first + count)``."""
    import numpy as np

    n = first.size
    return (
        first.astype(np.int64),
        count.astype(np.int64),
        np.full(n, RUN_UNALLOCATED, dtype=np.uint8),
        np.full(n, -1, dtype=np.int64),
        np.zeros(n, dtype=np.int64),
    )


# -- the disk -----------------------------------------------------------------------------
class ClusterMapDisk(Disk):
    """A read-only layer whose format maps clusters of ``cluster_size`` bytes.

    Subclasses set :attr:`host`, :attr:`filename`, :attr:`virtual_size` and
    :attr:`cluster_size`, and implement :meth:`_cluster_map`.
    """

    host: HostFile
    cluster_size: int
    #: The last map a format returned (a whole table or BAT piece, usually wider than
    #: the range asked for), so that small reads in a row decode it once.
    _last_map: ClusterMap | None = None

    @abc.abstractmethod
    def _cluster_map(self, first: int, end: int) -> ClusterMap:
        """A map of clusters ``[a, b)`` with ``a <= first < b``, ``b`` at most ``end``
        or the end of a table that ``end`` falls in (a format decodes whole tables and
        may stop early, at a table boundary or a cap).  Raises :class:`QcowlibError` for
        entries that cannot be read."""

    def _check_readable(self) -> None:
        """Raise when this layer's data cannot be read (an encrypted qcow, say)."""

    def _map_from(self, first: int, end: int) -> ClusterMap:
        """The map of clusters ``[first, b)`` for some ``first < b <= end``."""
        cached = self._last_map
        if cached is None or not cached.first <= first < cached.end:
            cached = self._cluster_map(first, end)
            if not cached.first <= first < cached.end:  # pragma: no cover - format bug
                raise AssertionError(f"{type(self).__name__} mapped no cluster at {first}")
            self._last_map = cached
        return cached.within(first, min(end, cached.end))

    # -- mapping ------------------------------------------------------------------------
    def _table_runs(self, start: int, end: int) -> RunArrays:
        """This layer's runs over guest ``[start, end)`` from its tables alone, in bytes."""
        import numpy as np

        self._check_readable()
        cs = self.cluster_size
        cluster, last = start // cs, -(-end // cs)
        parts: list[tuple[I64, I64, U8, I64, I64]] = []
        while cluster < last:
            cmap = self._map_from(cluster, last)
            parts.append(cluster_runs(cmap, cs))
            cluster = cmap.end
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=np.uint8), empty, empty
        if len(parts) == 1:
            first, count, kind, host, clen = parts[0]
        else:
            first, count, host, clen = (np.concatenate([p[i] for p in parts]) for i in (0, 1, 3, 4))
            kind = np.concatenate([p[2] for p in parts])
        # Clusters to bytes, clipped to [start, end) (the first and last runs only).
        s0 = first * cs
        s = np.maximum(s0, start)
        e = np.minimum((first + count) * cs, end)
        data = kind == RUN_DATA
        host = np.where(data, host + (s - s0), host)
        return s, e - s, kind, host, clen

    def layer_runs(self, offset: int, end: int) -> Runs:
        """This layer's runs over ``[offset, end)`` as arrays, decoded table-at-a-time.

        Holes of the host file inside data clusters stay data: QEMU asks the file only
        when a driver sets ``BDRV_BLOCK_RECURSE`` (qcow2 with preallocated metadata),
        which these drivers never do, so ``qemu-img map`` shows them as data too.
        """
        import numpy as np

        self._range(offset, end - offset)
        start, length, kind, host, clen = self._table_runs(offset, end)
        n = start.size
        return Runs(
            start,
            length,
            kind,
            host,
            clen,
            np.zeros(n, dtype=np.bool_),
            np.zeros(n, dtype=np.int64),
            (host >= 0).astype(np.int64),
            (None, self.filename),
        )

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        if end <= start:
            return
        name = self.filename
        s_, l_, k_, h_, c_ = self._table_runs(start, end)
        rows = zip(s_.tolist(), l_.tolist(), k_.tolist(), h_.tolist(), c_.tolist(), strict=True)
        for s, n, kind, host, clen in rows:
            if host < 0:
                yield Extent(s, n, RUN_KINDS[kind])
            else:
                yield Extent(s, n, RUN_KINDS[kind], host, 0, name, clen)

    # -- reads --------------------------------------------------------------------------
    def _read_own(self, offset: int, view: memoryview) -> list[tuple[Disk, int, memoryview]]:
        # As Disk._read_own, from the table runs (no hole probing: holes read as zeros);
        # Disk.read_into fills what the backing disk must, without recursion.
        start, end = offset, offset + len(view)
        below: list[tuple[Disk, int, memoryview]] = []
        s_, l_, k_, h_, c_ = self._table_runs(start, end)
        rows = zip(s_.tolist(), l_.tolist(), k_.tolist(), h_.tolist(), c_.tolist(), strict=True)
        for s, n, kind, host, clen in rows:
            part = view[s - start : s - start + n]
            if kind == RUN_DATA:
                self.host.pread_into(host, part)
            elif kind == RUN_COMPRESSED:
                ext = Extent(s, n, ExtentKind.COMPRESSED, host, 0, self.filename, clen)
                self._read_layer(ext, part)
            elif kind == RUN_ZERO or self.backing is None:
                part[:] = bytes(n)
            else:
                backing = self.backing
                split = min(s + n, max(s, backing.virtual_size))
                if split > s:
                    below.append((backing, s, part[: split - s]))
                if split < s + n:
                    part[split - s :] = bytes(s + n - split)
        return below

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        assert ext.host_offset is not None
        self.host.pread_into(ext.host_offset, buf)

    def host_file_for(self, ext: Extent) -> HostFile | None:
        return self.host if ext.kind is ExtentKind.DATA else None

    def runs_data_file(self) -> HostFile | None:
        return self.host

    def _close_layer(self) -> None:
        self.host.close()
