"""Grain maps of sparse extents, decoded a bounded window at a time.

A sparse extent's grain map is QEMU's two-level ``l1_table``/``l2_table``.  QEMU reads
the directory on open and one grain table at a time through its L2 cache;
:class:`GrainTables` does the same a window at a time: each call reads a stretch of the
directory (at most :data:`MAX_DIRECTORY_READ` bytes) and the grain tables it names (at
most :data:`MAX_WINDOW_ENTRIES` entries, at least one table), and turns them into runs
with :func:`~qcowlib.formats.vmdk.mapping.window_runs`.  Memory is bounded by the window
and the runs, never by the capacity or the tables present, so an ESX snapshot delta of
any size maps in a few MiB.  The last window is kept, so that small reads in a row
decode it once.

On open, the whole directory is scanned (a window at a time too): more tables than the
file can hold (a crafted directory) and a table past the end of the file are refused
before any table is read.  A data grain past the end of the file is refused
(``strict``) when its window is decoded; opened for ``check`` it is left for the check
to report.

Hosted sparse extents (``KDMV``) are mapped whole on open
(:mod:`qcowlib.formats.vmdk.reader`) and handed over as a :class:`WholeMap`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib.errors import CorruptImage, QcowlibError, TruncatedImage
from qcowlib.formats._clustermap import read_tables
from qcowlib.formats.vmdk.mapping import (
    GD_TABLE,
    GD_UNALLOC,
    RUN_ERROR,
    GrainRuns,
    first_bad_grain,
    past_end_grains,
    window_runs,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from qcowlib.core.hostfile import HostFile

    I64 = npt.NDArray[np.int64]
    U8 = npt.NDArray[np.uint8]

#: Grain table entries decoded per window at most (at least one table's): about 50
#: bytes of arrays an entry, so some 12 MiB.
MAX_WINDOW_ENTRIES: Final = 1 << 18
#: Directory bytes read at once at most (kept for the windows that follow: with the
#: entries decoded, about 3 MiB), and at least when a read is smaller (a COWD table's
#: worth, as QEMU's L2 cache reads).
MAX_DIRECTORY_READ: Final = 1 << 20
MIN_DIRECTORY_READ: Final = 16 << 10


class Geometry(NamedTuple):
    """Where a sparse extent's grain map lies and how it is shaped."""

    gd_offset: int  # bytes
    gd_entries: int  # directory entries mapped: the directory's, at most the capacity's
    entry_size: int  # bytes of a directory entry
    gtes: int  # entries of a grain table
    gt_bytes: int  # bytes of a grain table
    grain_size: int  # sectors of a grain
    n_grains: int  # grains of the capacity
    what: str  # the directory's name in errors

    @property
    def mapped_grains(self) -> int:
        """Grains the directory covers (the rest are :data:`RUN_ERROR`)."""
        return min(self.gd_entries * self.gtes, self.n_grains)


class GrainMap(abc.ABC):
    """A sparse extent's grains as runs, a window (or the whole map) per call."""

    grain_size: int
    n_grains: int

    @abc.abstractmethod
    def runs(self, first: int, end: int) -> GrainRuns:
        """Runs over grains ``[a, b)`` with ``a <= first < b`` (``b`` at most ``end``
        or the end of the table ``end`` falls in).  Raises :class:`QcowlibError` for a
        directory or table that cannot be read or a grain past the end of the file."""

    def first_bad(self, file_size: int) -> tuple[int, bool] | None:
        """The first grain QEMU's check stops at, and whether QEMU cannot map it (else
        its data lies past the end of the ``file_size``-byte file); ``None``: none."""
        grain = 0
        while grain < self.n_grains:
            window = self.runs(grain, self.n_grains)
            bad = first_bad_grain(window, grain_size=self.grain_size, file_size=file_size)
            if bad is not None:
                return bad
            grain = window.end
        return None


class WholeMap(GrainMap):
    """A grain map decoded whole on open (hosted sparse extents)."""

    def __init__(self, runs: GrainRuns, grain_size: int) -> None:
        self._runs = runs
        self.grain_size, self.n_grains = grain_size, runs.end

    def runs(self, first: int, end: int) -> GrainRuns:
        return self._runs


class GrainTables(GrainMap):
    """The grain map of an extent file, read a window at a time (COWD, seSparse).

    Subclasses decode the format's directory and grain table entries.  Raises (on
    open) :class:`CorruptImage` for more tables than the file holds and
    :class:`TruncatedImage` for a table past its end, each naming ``filename``.
    """

    #: Directory bytes read at once, at most and at least (see the module's constants).
    max_directory_read = MAX_DIRECTORY_READ
    min_directory_read = MIN_DIRECTORY_READ

    def __init__(
        self,
        host: HostFile,
        filename: str,
        geometry: Geometry,
        *,
        strict: bool = True,
        window: int = MAX_WINDOW_ENTRIES,
    ) -> None:
        self.host, self.filename, self.geometry = host, filename, geometry
        self.grain_size, self.n_grains = geometry.grain_size, geometry.n_grains
        self.strict, self.window = strict, window
        self._last: GrainRuns | None = None
        #: Grain ranges of the last window whose data lies past the end of the file.
        self._past_end: tuple[I64, I64] | None = None
        self._dir: tuple[int, U8, I64] | None = None  # first entry, states, table offsets
        try:
            self._scan_directory()
        except QcowlibError as exc:
            raise exc.with_file(filename) from None

    @property
    def _dir_step(self) -> int:
        return max(1, self.max_directory_read // self.geometry.entry_size)

    @abc.abstractmethod
    def _directory(self, raw: bytes) -> tuple[U8, I64]:
        """Each entry's ``GD_*`` state and its table's file offset (0 unless a table)."""

    @abc.abstractmethod
    def _entries(self, raw: bytearray, count: int) -> tuple[U8, I64]:
        """``count`` grain table entries' ``RUN_*`` kinds and sectors (0 unless data)."""

    # -- the directory ------------------------------------------------------------------
    def _read_directory(self, t0: int, t1: int) -> tuple[U8, I64]:
        g = self.geometry
        at = g.gd_offset + t0 * g.entry_size
        return self._directory(self.host.pread_exact(at, (t1 - t0) * g.entry_size, g.what))

    def _directory_from(self, t0: int, t1: int) -> tuple[U8, I64]:
        """States and table offsets of directory entries from ``t0`` up to ``t1`` or
        fewer (at least one), from the directory stretch read last when it holds ``t0``."""
        cached = self._dir
        if cached is None or not cached[0] <= t0 < cached[0] + cached[1].size:
            g = self.geometry
            want = min(self._dir_step, max(t1 - t0, self.min_directory_read // g.entry_size))
            cached = self._dir = (t0, *self._read_directory(t0, min(g.gd_entries, t0 + want)))
        c0, state, offset = cached
        return state[t0 - c0 : t1 - c0], offset[t0 - c0 : t1 - c0]

    def _scan_directory(self) -> None:
        """Refuse more tables than the file can hold, then a table past its end."""
        import numpy as np

        g, size = self.geometry, self.host.size
        tables = 0
        past: tuple[int, int] | None = None  # first (entry, offset) past the end
        for t0 in range(0, g.gd_entries, self._dir_step):
            state, offset = self._read_directory(t0, min(g.gd_entries, t0 + self._dir_step))
            is_table = state == GD_TABLE
            tables += int(np.count_nonzero(is_table))
            if tables * g.gt_bytes > size:
                raise CorruptImage(
                    f"{tables} or more grain tables cannot fit a file of {size} bytes",
                    structure=g.what,
                    offset=g.gd_offset,
                )
            bad = np.flatnonzero(is_table & (offset + g.gt_bytes > size))
            if past is None and bad.size:
                i = int(bad[0])
                past = t0 + i, int(offset[i])
        if past is not None:
            i, at = past
            raise TruncatedImage(
                f"grain table at {at:#x} lies past the end of the file",
                structure=g.what,
                field=f"entry[{i}]",
                offset=g.gd_offset + i * g.entry_size,
            )

    # -- windows ------------------------------------------------------------------------
    def runs(self, first: int, end: int) -> GrainRuns:
        """The runs of the window holding grain ``first`` (to ``end`` at least as far as
        a window reaches).  ``strict``: a data grain of ``[first, end)`` past the end of
        the file is refused (whatever else its window holds: the answer does not depend
        on the window's size)."""
        last = self._last
        if last is None or not last.first <= first < last.end:
            try:
                last = self._window(first, end)
            except QcowlibError as exc:
                raise exc.with_file(self.filename) from None
            self._last = last
            self._past_end = past_end_grains(
                last, grain_size=self.grain_size, file_size=self.host.size
            )
        if self.strict:
            self._refuse_past_end(first, end)
        return last

    def _refuse_past_end(self, first: int, end: int) -> None:
        if self._past_end is None or not self._past_end[0].size:
            return
        starts, ends = self._past_end
        i = int(ends.searchsorted(first, side="right"))
        if i < starts.size and int(starts[i]) < end:
            raise TruncatedImage(
                f"grain {max(first, int(starts[i]))} lies past the end of the file",
                structure="vmdk grain table",
                file=self.filename,
            )

    def _window(self, first: int, end: int) -> GrainRuns:
        import numpy as np

        g = self.geometry
        t0 = first // g.gtes
        if t0 >= g.gd_entries:  # QEMU: l1_index >= l1_size, an I/O error
            return GrainRuns.single(g.mapped_grains, g.n_grains, RUN_ERROR)
        state, offset = self._directory_from(t0, max(t0 + 1, min(g.gd_entries, -(-end // g.gtes))))
        # Unallocated entries cost nothing; a table or a bad entry costs its grains.
        cost = np.cumsum(np.where(state == GD_UNALLOC, 0, g.gtes))
        n = max(1, int(np.searchsorted(cost, max(self.window, g.gtes), side="right")))
        state = state[:n]
        tables = offset[:n][state == GD_TABLE]
        raw = read_tables(self.host, tables.tolist(), g.gt_bytes, "vmdk grain table")
        kind, sector = self._entries(raw, tables.size * g.gtes)
        runs = window_runs(
            state, t0, kind, sector, gtes=g.gtes, n_grains=g.n_grains, grain_size=g.grain_size
        )
        return runs
