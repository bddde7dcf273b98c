"""A chain's map as run arrays, resolved with numpy, and reads driven by them.

:func:`resolve` is :meth:`Disk.extents` done with array operations: each layer's runs
come from :meth:`Disk.layer_runs` (a decoded L2 table at a time for qcow2), the
unallocated gaps of a layer are intersected with its backing's runs in one vectorised
step, and adjacent runs are merged as ``qemu-img map`` merges them.  A fragmented
overlay chain (thousands of small runs per layer) costs a few numpy calls per layer and
window instead of a Python generator step per run and layer.

:class:`RunSource` hands out the runs of successive guest ranges from windows of
bounded size, so memory stays bounded on any disk; :class:`ChainReader` fills a buffer
from them with one positional read per run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import (
    RUN_COMPRESSED,
    RUN_DATA,
    RUN_UNALLOCATED,
    Disk,
    Extent,
    Runs,
)
from qcowlib.core.hostfile import HostFile

I64 = npt.NDArray[np.int64]

#: Guest bytes resolved at once to start with; the window then grows or shrinks so
#: that it holds about :data:`WINDOW_RUNS` runs (bounded memory on any disk, few
#: windows on sparse or contiguous ones).
WINDOW_BYTES = 64 << 20
WINDOW_RUNS = 1 << 16
#: Windows are whole multiples of this (a large power of two, so they start on
#: cluster and table boundaries).
WINDOW_ALIGN = 1 << 21
#: Runs of one layer a window can hold at most: a window never grows past this many of
#: the chain's shortest possible run (:attr:`Disk.run_granule`), so an image whose
#: tables repeat one dense block everywhere (VHD BAT entries that all point at one
#: block with an alternating bitmap) cannot fill memory with one window's runs
#: (~15 MB of run arrays a layer at most).
MAX_WINDOW_RUNS = 1 << 18
_ZEROS = bytes(1 << 20)
_READ_KINDS = (RUN_DATA, RUN_COMPRESSED)


def _take(runs: Runs, idx: npt.NDArray[np.intp] | slice) -> Runs:
    return Runs(
        runs.start[idx],
        runs.length[idx],
        runs.kind[idx],
        runs.host[idx],
        runs.clen[idx],
        runs.hole[idx],
        runs.depth[idx],
        runs.file[idx],
        runs.files,
    )


def _concat(parts: list[Runs], files: tuple[str | None, ...]) -> Runs:
    return Runs(
        np.concatenate([p.start for p in parts]),
        np.concatenate([p.length for p in parts]),
        np.concatenate([p.kind for p in parts]),
        np.concatenate([p.host for p in parts]),
        np.concatenate([p.clen for p in parts]),
        np.concatenate([p.hole for p in parts]),
        np.concatenate([p.depth for p in parts]),
        np.concatenate([p.file for p in parts]),
        files,
    )


def _refile(runs: Runs, files: list[str | None], depth: int) -> Runs:
    """``runs`` with file indexes into the shared ``files`` list and depths shifted."""
    remap = np.array([_file_index(files, f) for f in runs.files], dtype=np.int64)
    return Runs(
        runs.start,
        runs.length,
        runs.kind,
        runs.host,
        runs.clen,
        runs.hole,
        runs.depth + depth,
        remap[runs.file] if runs.file.size else runs.file,
        runs.files,
    )


def _file_index(files: list[str | None], name: str | None) -> int:
    if name not in files:
        files.append(name)
    return files.index(name)


def _clip_to_gaps(runs: Runs, gap_start: I64, gap_end: I64) -> Runs:
    """The parts of ``runs`` (contiguous, sorted) inside the sorted disjoint gaps."""
    run_end = runs.start + runs.length
    first = np.searchsorted(run_end, gap_start, side="right")
    last = np.searchsorted(runs.start, gap_end, side="left")
    counts = np.maximum(last - first, 0)
    total = int(counts.sum())
    gap = np.repeat(np.arange(gap_start.size), counts)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    idx = first[gap] + within
    part = _take(runs, idx)
    start = np.maximum(part.start, gap_start[gap])
    end = np.minimum(part.start + part.length, gap_end[gap])
    shift = start - part.start
    moves = (part.host >= 0) & (part.kind != RUN_COMPRESSED)
    return Runs(
        start,
        end - start,
        part.kind,
        np.where(moves, part.host + shift, part.host),
        part.clen,
        part.hole,
        part.depth,
        part.file,
        part.files,
    )


def _resolve_layer(disk: Disk, start: int, end: int, depth: int, files: list[str | None]) -> Runs:
    """The runs of ``disk``'s chain over ``[start, end)``, sorted by guest offset.

    Layer by layer, in a loop (chains may be thousands of images deep): each layer
    keeps what it decides inside the gaps left by the layers above, and passes its own
    unallocated gaps (below its backing's end) down to its backing.
    """
    parts: list[Runs] = []
    g_start = np.array([start], dtype=np.int64)
    g_end = np.array([end], dtype=np.int64)
    layer: Disk | None = disk
    while layer is not None and g_start.size:
        own = _refile(layer.layer_runs(int(g_start[0]), int(g_end[-1])), files, depth)
        if depth != 0 or g_start.size > 1:
            own = _clip_to_gaps(own, g_start, g_end)
        backing = layer.backing
        unalloc = own.kind == RUN_UNALLOCATED
        if backing is None or not unalloc.any():
            parts.append(own)
            break
        parts.append(_take(own, np.flatnonzero(~unalloc)))
        # Past the backing file's end an unallocated run reads zeros, decided here; the
        # part below it is the backing's.
        bsize = backing.virtual_size
        u_start = own.start[unalloc]
        u_end = u_start + own.length[unalloc]
        past = u_end > np.maximum(u_start, bsize)
        if past.any():
            parts.append(_beyond(_take(own, np.flatnonzero(unalloc)[past]), bsize))
        g_start = np.minimum(u_start, bsize)
        g_end = np.minimum(u_end, bsize)
        has_gap = g_end > g_start
        g_start, g_end = g_start[has_gap], g_end[has_gap]
        layer = backing
        depth += 1
    merged = parts[0] if len(parts) == 1 else _concat(parts, parts[0].files)
    if len(parts) == 1:
        return merged
    return _take(merged, np.argsort(merged.start, kind="stable"))


def _beyond(beyond: Runs, bsize: int) -> Runs:
    """The parts of unallocated runs past the backing disk's end ``bsize``."""
    cut = np.maximum(beyond.start, bsize)
    moves = beyond.host >= 0
    return Runs(
        cut,
        beyond.start + beyond.length - cut,
        beyond.kind,
        np.where(moves, beyond.host + (cut - beyond.start), beyond.host),
        beyond.clen,
        beyond.hole,
        beyond.depth,
        beyond.file,
        beyond.files,
    )


def coalesce_runs(runs: Runs) -> Runs:
    """Merge adjacent runs as :func:`qcowlib.core.disk.coalesce` merges extents."""
    keep = runs.length > 0
    if not keep.all():
        runs = _take(runs, np.flatnonzero(keep))
    n = len(runs)
    if n < 2:
        return runs
    prev_end = runs.start[:-1] + runs.length[:-1]
    has_host = runs.host >= 0
    host_ok = np.where(
        has_host[1:] & has_host[:-1],
        runs.host[:-1] + runs.length[:-1] == runs.host[1:],
        ~(has_host[1:] | has_host[:-1]),
    )
    joins = (
        (prev_end == runs.start[1:])
        & (runs.kind[1:] == runs.kind[:-1])
        & (runs.depth[1:] == runs.depth[:-1])
        & (runs.file[1:] == runs.file[:-1])
        & (runs.hole[1:] == runs.hole[:-1])
        & (runs.kind[1:] != RUN_COMPRESSED)
        & host_ok
    )
    if not joins.any():
        return runs
    heads = np.flatnonzero(np.concatenate(([True], ~joins)))
    ends = np.append(heads[1:], n)
    merged = _take(runs, heads)
    last = ends - 1
    length = runs.start[last] + runs.length[last] - merged.start
    return Runs(
        merged.start,
        length,
        merged.kind,
        merged.host,
        merged.clen,
        merged.hole,
        merged.depth,
        merged.file,
        merged.files,
    )


def resolve(disk: Disk, start: int = 0, end: int | None = None) -> Runs:
    """The chain's resolved runs over ``[start, end)``: what ``disk.extents(start, ...)``
    yields, as arrays (merged the same way within the range)."""
    if end is None:
        end = disk.virtual_size
    files: list[str | None] = []
    runs = _resolve_layer(disk, start, end, 0, files)
    runs = Runs(
        runs.start,
        runs.length,
        runs.kind,
        runs.host,
        runs.clen,
        runs.hole,
        runs.depth,
        runs.file,
        tuple(files),
    )
    return coalesce_runs(runs)


def reads_zero(runs: Runs) -> npt.NDArray[np.bool_]:
    """Per run: known to read as zeros without looking at data."""
    data = (runs.kind == RUN_DATA) | (runs.kind == RUN_COMPRESSED)
    out: npt.NDArray[np.bool_] = ~data | runs.hole
    return out


class RunSource:
    """Runs of successive guest ranges of a chain, resolved a window at a time.

    Ranges must be asked for in increasing order (they may overlap the last one).
    """

    def __init__(self, disk: Disk, window: int = WINDOW_BYTES) -> None:
        self.disk = disk
        self.size = disk.virtual_size
        granule = min(layer.run_granule for layer in disk.chain)
        self.max_window = max(WINDOW_ALIGN, MAX_WINDOW_RUNS * granule)
        self.window = min(window, self.max_window)
        self.runs: Runs | None = None
        self.lo = self.hi = 0
        self._ends: I64 = np.zeros(0, dtype=np.int64)

    def _resolve(self, start: int, end: int) -> Runs:
        """Runs from ``start`` to at least ``end``, and adapt the window to their count."""
        hi = min(self.size, max(end, -(-(start + self.window) // WINDOW_ALIGN) * WINDOW_ALIGN))
        runs = resolve(self.disk, start, hi)
        if len(runs) * 4 < WINDOW_RUNS:
            self.window = min(self.window * 4, self.max_window)
        elif len(runs) > WINDOW_RUNS * 4:
            self.window = max(self.window // 4, WINDOW_ALIGN)
        self.lo, self.hi = start, hi
        self.runs = runs
        self._ends = runs.start + runs.length
        return runs

    def get(self, start: int, end: int) -> tuple[Runs, int, int]:
        """The window's runs and the index range ``[a, b)`` of those over ``[start, end)``."""
        runs = self.runs
        if runs is None or start < self.lo or end > self.hi:
            runs = self._resolve(start, end)
        a = int(np.searchsorted(self._ends, start, side="right"))
        b = int(np.searchsorted(runs.start, end, side="left"))
        return runs, a, b

    def _window_units(self, unit: int) -> Iterator[tuple[I64, I64]]:
        """Window by window over the whole disk, the merged unit ranges ``[first, end)``
        of runs not known to read as zeros (memory follows the merged ranges of one
        window, not its runs)."""
        pos = 0
        while pos < self.size:
            runs = self._resolve(pos, pos)
            data = ~reads_zero(runs)
            yield merge_unit_ranges(
                runs.start[data] // unit, -(-(runs.start[data] + runs.length[data]) // unit)
            )
            pos = self.hi

    def nonzero_units(self, unit: int) -> tuple[I64, I64]:
        """Unit ranges ``[first, end)`` of the whole disk that may hold non-zero data
        (runs not known to read as zeros, rounded out to ``unit`` and merged)."""
        parts = list(self._window_units(unit))
        return merge_unit_ranges(
            np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
            np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64),
        )

    def nonzero_unit_count(self, unit: int) -> int:
        """How many units :meth:`nonzero_units` covers, without keeping the ranges
        (``unit`` a power of two up to :data:`WINDOW_ALIGN`: windows start on its
        multiples, so no unit spans two)."""
        if unit & (unit - 1) or unit > WINDOW_ALIGN:
            raise ValueError(f"unit {unit} is not a power of two up to {WINDOW_ALIGN}")
        return sum(int((end - first).sum()) for first, end in self._window_units(unit))


def merge_unit_ranges(first: I64, end: I64) -> tuple[I64, I64]:
    """Sorted ``[first, end)`` ranges with overlapping or touching ones merged."""
    if first.size == 0:
        return first, end
    order = np.argsort(first, kind="stable")
    first, end = first[order], end[order]
    reach = np.maximum.accumulate(end)
    new = np.concatenate(([True], first[1:] > reach[:-1]))
    heads = np.flatnonzero(new)
    tails = np.append(heads[1:], first.size) - 1
    return first[heads], reach[tails]


@dataclass
class ChainReader:
    """Fills buffers with a chain's guest bytes from its resolved runs."""

    disk: Disk

    def __post_init__(self) -> None:
        self.chain = self.disk.chain
        self.files: list[HostFile | None] = [d.runs_data_file() for d in self.chain]

    def read(self, runs: Runs, a: int, b: int, start: int, view: memoryview) -> None:
        """Fill ``view`` with guest bytes from ``start``, using runs ``[a, b)`` (which
        must cover the range)."""
        end = start + len(view)
        starts = runs.start[a:b].tolist()
        lengths = runs.length[a:b].tolist()
        kinds = runs.kind[a:b].tolist()
        hosts = runs.host[a:b].tolist()
        depths = runs.depth[a:b].tolist()
        holes = runs.hole[a:b].tolist()
        for i, s in enumerate(starts):
            e = min(end, s + lengths[i])
            lo = max(s, start)
            if e <= lo:
                continue
            part = view[lo - start : e - start]
            kind = kinds[i]
            if holes[i] or kind not in _READ_KINDS:
                _fill_zeros(part)
                continue
            host_file = self.files[depths[i]] if kind == RUN_DATA else None
            if host_file is not None:
                host_file.pread_into(hosts[i] + (lo - s), part)
                continue
            ext = runs.extent(a + i)
            if lo != s or e != s + lengths[i]:
                ext = ext.clip(lo, e)
            self.chain[depths[i]]._read_layer(ext, part)

    def read_extent(self, ext: Extent, view: memoryview) -> None:
        """Fill ``view`` from one resolved extent."""
        if not ext.reads_zero:
            self.chain[ext.depth]._read_layer(ext, view)
        else:
            _fill_zeros(view)


def _fill_zeros(view: memoryview) -> None:
    n = len(view)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        view[pos : pos + step] = _ZEROS[:step]
        pos += step
