"""Grain directories and tables of any sparse extent kind, turned into runs.

COWD and seSparse extents (and hosted sparse ones) share one shape, QEMU's two-level
``l1_table``/``l2_table`` map: a directory entry is unallocated, names a grain table, or
is invalid (an I/O error to QEMU when a read reaches it); a grain table entry gives
each grain a kind and, for data, a sector.  :func:`window_runs` turns a stretch of the
directory and the tables it names into runs (first grain, grain count, kind, first
grain's sector) with the cluster-map machinery the QED, qcow and Parallels readers use
(:func:`qcowlib.formats._clustermap.cluster_runs`): the work is bounded by the
directory entries and tables given, never by the capacity.  Readers decode a bounded
window at a time (:mod:`qcowlib.formats.vmdk.grainmap`); :func:`table_runs` is the same
over a whole directory at once.

Pure: nothing here reads a file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib.core.disk import RUN_COMPRESSED, RUN_DATA, RUN_UNALLOCATED, RUN_ZERO

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]
    U8 = npt.NDArray[np.uint8]

__all__ = [
    "GD_ERROR",
    "GD_TABLE",
    "GD_UNALLOC",
    "RUN_COMPRESSED",
    "RUN_DATA",
    "RUN_ERROR",
    "RUN_UNALLOC",
    "RUN_ZERO",
    "GrainRuns",
    "first_bad_grain",
    "past_end_grains",
    "table_runs",
    "window_runs",
]

#: Run kinds: the engine's (:mod:`qcowlib.core.disk`), and one of the grain map's own.
RUN_UNALLOC: Final = RUN_UNALLOCATED
#: A grain QEMU cannot map (a bad directory or table entry, or past the directory):
#: reads and ``map`` fail there, ``check`` reports it.
RUN_ERROR: Final = 4

#: Directory entry states for :func:`window_runs`.
GD_UNALLOC: Final = 0
GD_TABLE: Final = 1
GD_ERROR: Final = 2


class GrainRuns(NamedTuple):
    """Runs covering grains ``[first, end)`` in order, no gaps: each run's first grain,
    grain count (``length``), kind (``RUN_*``) and first grain's sector (0 unless data or
    compressed).  No two neighbours in one window could merge; the last run of a window
    and the first of the next may (the engine merges extents as ``qemu-img map`` does)."""

    first: int
    end: int
    start: I64
    length: I64
    kind: U8
    sector: I64

    @classmethod
    def single(cls, first: int, end: int, kind: int) -> GrainRuns:
        """One run of ``kind`` over ``[first, end)``."""
        import numpy as np

        return cls(
            first,
            end,
            np.array([first], dtype=np.int64),
            np.array([end - first], dtype=np.int64),
            np.array([kind], dtype=np.uint8),
            np.zeros(1, dtype=np.int64),
        )


def window_runs(
    gd_state: U8,
    t0: int,
    table_kind: U8,
    table_sector: I64,
    *,
    gtes: int,
    n_grains: int,
    grain_size: int,
) -> GrainRuns:
    """Runs of the grains that directory entries ``[t0, t0 + len(gd_state))`` map.

    ``gd_state`` holds one :data:`GD_UNALLOC`, :data:`GD_TABLE` or :data:`GD_ERROR` per
    directory entry; ``table_kind`` and ``table_sector`` hold ``gtes`` entries for each
    :data:`GD_TABLE` entry, in directory order.  The runs cover the entries' grains
    below ``n_grains``; consecutive grains of one kind form one run, data only while
    their sectors follow on (``grain_size`` sectors a grain), a compressed grain is a
    run of its own.
    """
    import numpy as np

    from qcowlib.formats._clustermap import ClusterMap, cluster_runs

    state = np.asarray(gd_state, dtype=np.uint8)
    first, end = t0 * gtes, min((t0 + state.size) * gtes, n_grains)
    listed = np.flatnonzero(state != GD_UNALLOC)
    is_table = state[listed] == GD_TABLE
    kind = np.asarray(table_kind, dtype=np.uint8).reshape(-1, gtes)
    sector = np.asarray(table_sector, dtype=np.int64).reshape(-1, gtes)
    if not is_table.all():  # bad directory entries: a table's worth of error grains
        kind, sector = _with_error_rows(is_table, kind, sector)
    index = (((listed + t0) * gtes)[:, None] + np.arange(gtes, dtype=np.int64)).reshape(-1)
    n = int(np.searchsorted(index, end))  # the last table may reach past the capacity
    cmap = ClusterMap(
        first,
        end,
        index[:n],
        kind.reshape(-1)[:n],
        sector.reshape(-1)[:n],
        np.broadcast_to(np.zeros(1, dtype=np.int64), n),  # no compressed lengths
    )
    r_first, r_count, r_kind, r_host, _ = cluster_runs(cmap, grain_size)
    mapped = (r_kind == RUN_DATA) | (r_kind == RUN_COMPRESSED)
    return GrainRuns(first, end, r_first, r_count, r_kind, np.where(mapped, r_host, 0))


def _with_error_rows(is_table: npt.NDArray[np.bool_], kind: U8, sector: I64) -> tuple[U8, I64]:
    """``kind`` and ``sector`` rows for the tables, :data:`RUN_ERROR` rows elsewhere."""
    import numpy as np

    all_kind = np.full((is_table.size, kind.shape[1]), RUN_ERROR, dtype=np.uint8)
    all_sector = np.zeros(all_kind.shape, dtype=np.int64)
    all_kind[is_table], all_sector[is_table] = kind, sector
    return all_kind, all_sector


def table_runs(
    gd_state: U8,
    table_kind: U8,
    table_sector: I64,
    *,
    gtes: int,
    n_grains: int,
    grain_size: int,
) -> GrainRuns:
    """The runs of a whole two-level grain map at once (see :func:`window_runs`).

    Grains past the directory are :data:`RUN_ERROR` (QEMU: ``l1_index >= l1_size``).
    """
    import numpy as np

    if n_grains <= 0:
        return GrainRuns.single(0, 0, RUN_UNALLOC)
    state = np.asarray(gd_state, dtype=np.uint8)[: -(-n_grains // gtes)]
    k = int(np.count_nonzero(state == GD_TABLE)) * gtes
    runs = window_runs(
        state,
        0,
        table_kind[:k],
        table_sector[:k],
        gtes=gtes,
        n_grains=n_grains,
        grain_size=grain_size,
    )
    if runs.end >= n_grains:
        return runs
    tail = GrainRuns.single(runs.end, n_grains, RUN_ERROR)
    if runs.end == 0:
        return tail
    if runs.kind[-1] == RUN_ERROR:  # bad entries at the directory's end: one run
        length = runs.length.copy()
        length[-1] += n_grains - runs.end
        return runs._replace(end=n_grains, length=length)
    return GrainRuns(
        0,
        n_grains,
        np.concatenate((runs.start, tail.start)),
        np.concatenate((runs.length, tail.length)),
        np.concatenate((runs.kind, tail.kind)),
        np.concatenate((runs.sector, tail.sector)),
    )


def past_end_grains(runs: GrainRuns, *, grain_size: int, file_size: int) -> tuple[I64, I64]:
    """``(starts, ends)`` of the grain ranges of ``runs`` whose data lies at or past the
    end of the file (``file_size`` bytes), in order."""
    import numpy as np

    limit = -(-file_size // 512)
    count, kind, sector = runs.length, runs.kind, runs.sector
    data = (kind == RUN_DATA) | (kind == RUN_COMPRESSED)
    skip = np.where(data, np.maximum(0, -(-(limit - sector) // grain_size)), count)
    bad = skip < count
    return runs.start[bad] + skip[bad], runs.start[bad] + count[bad]


def first_bad_grain(runs: GrainRuns, *, grain_size: int, file_size: int) -> tuple[int, bool] | None:
    """The first grain of ``runs`` QEMU's check stops at: ``(grain, is_error)`` or
    ``None``.

    A grain is bad when it is :data:`RUN_ERROR` (``is_error``) or data whose sector is at
    or past the end of the file (``file_size`` bytes).
    """
    import numpy as np

    limit = -(-file_size // 512)
    count, kind, sector = runs.length, runs.kind, runs.sector
    data = (kind == RUN_DATA) | (kind == RUN_COMPRESSED)
    # Grain j of a data run lies at sector + j * grain_size (compressed runs are 1 grain).
    skip = np.where(data, np.maximum(0, -(-(limit - sector) // grain_size)), count)
    skip = np.where(kind == RUN_ERROR, 0, skip)
    bad = np.flatnonzero(skip < count)
    if not bad.size:
        return None
    i = int(bad[0])
    return int(runs.start[i]) + int(skip[i]), int(kind[i]) == RUN_ERROR


def clip_runs(runs: GrainRuns, grain_bytes: int, pos: int, stop: int) -> tuple[I64, I64, U8, I64]:
    """The runs of a window over extent bytes ``[pos, stop)`` (inside the window), clipped
    to it: start and length in bytes, kind, host offset (data: where the clipped run's
    first byte lies; compressed: the grain's marker; else -1)."""
    import numpy as np

    j = int(np.searchsorted(runs.start, pos // grain_bytes, side="right")) - 1
    k = int(np.searchsorted(runs.start, -(-stop // grain_bytes)))
    first, kind = runs.start[j:k] * grain_bytes, runs.kind[j:k]
    lo = np.maximum(first, pos)
    hi = np.minimum(first + runs.length[j:k] * grain_bytes, stop)
    at = runs.sector[j:k] * 512
    host = np.where(kind == RUN_DATA, at + (lo - first), np.where(kind == RUN_COMPRESSED, at, -1))
    return lo, hi - lo, kind, host
