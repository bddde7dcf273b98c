"""Grain directories and tables of any sparse extent kind, turned into runs.

COWD and seSparse extents (and hosted sparse ones) share one shape, QEMU's two-level
``l1_table``/``l2_table`` map: a directory entry is unallocated, names a grain table, or
is invalid (an I/O error to QEMU when a read reaches it); a grain table entry gives
each grain a kind and, for data, a sector.  :func:`table_runs` turns that into runs
(first grain, kind, first grain's sector) with array operations: the work is bounded by
the directory and the tables present, never by the capacity.

Pure: nothing here reads a file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]
    U8 = npt.NDArray[np.uint8]

#: Run kinds (the reader's names for them are the same numbers).
RUN_UNALLOC: Final = 0
RUN_ZERO: Final = 1
RUN_DATA: Final = 2
RUN_COMPRESSED: Final = 3
#: A grain QEMU cannot map (a bad directory or table entry, or past the directory):
#: reads and ``map`` fail there, ``check`` reports it.
RUN_ERROR: Final = 4

#: Directory entry states for :func:`table_runs`.
GD_UNALLOC: Final = 0
GD_TABLE: Final = 1
GD_ERROR: Final = 2


def table_runs(
    gd_state: U8,
    table_kind: U8,
    table_sector: I64,
    *,
    gtes: int,
    n_grains: int,
    grain_size: int,
) -> tuple[I64, U8, I64]:
    """Runs of a two-level grain map.

    ``gd_state`` holds one :data:`GD_UNALLOC`, :data:`GD_TABLE` or :data:`GD_ERROR` per
    directory entry; ``table_kind`` and ``table_sector`` hold ``gtes`` entries for each
    :data:`GD_TABLE` entry, in directory order.  Grains past the directory are
    :data:`RUN_ERROR` (QEMU: ``l1_index >= l1_size``).  Consecutive grains of one kind
    form one run, data only while their sectors follow on.  Returns arrays of the runs'
    first grain, kind and first grain's sector (0 unless data).
    """
    import numpy as np

    state = np.asarray(gd_state, dtype=np.uint8)
    is_table = state == GD_TABLE
    per_gd = np.where(is_table, gtes, 1).astype(np.int64)
    total = int(per_gd.sum())
    gd_of_item = np.repeat(np.arange(state.size, dtype=np.int64), per_gd)
    first_item = np.cumsum(per_gd) - per_gd
    within = np.arange(total, dtype=np.int64) - np.repeat(first_item, per_gd)
    start = gd_of_item * gtes + within
    in_table = is_table[gd_of_item]
    kind = np.where(state[gd_of_item] == GD_ERROR, RUN_ERROR, RUN_UNALLOC).astype(np.uint8)
    sector = np.zeros(total, dtype=np.int64)
    kind[in_table] = table_kind
    sector[in_table] = table_sector
    if state.size * gtes < n_grains:
        start = np.append(start, state.size * gtes)
        kind = np.append(kind, np.uint8(RUN_ERROR))
        sector = np.append(sector, 0)
    keep = start < n_grains
    start, kind, sector = start[keep], kind[keep], sector[keep]
    sector[kind != RUN_DATA] = 0
    n = start.size
    if n == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.uint8), np.zeros(1, np.int64)
    length = np.diff(np.append(start, n_grains))
    breaks = np.empty(n, dtype=np.bool_)
    breaks[0] = True
    breaks[1:] = (kind[1:] != kind[:-1]) | (
        (kind[1:] == RUN_DATA) & (sector[1:] != sector[:-1] + length[:-1] * grain_size)
    )
    first = np.flatnonzero(breaks)
    return start[first], kind[first], sector[first]


def first_bad_grain(
    run_start: I64,
    run_kind: U8,
    run_sector: I64,
    *,
    n_grains: int,
    grain_size: int,
    file_size: int,
) -> tuple[int, bool] | None:
    """The first grain QEMU's check stops at: ``(grain, is_error)`` or ``None``.

    A grain is bad when it is :data:`RUN_ERROR` (``is_error``) or data whose sector is at
    or past the end of the file (``file_size`` bytes).
    """
    import numpy as np

    limit = -(-file_size // 512)
    count = np.diff(np.append(run_start, n_grains))
    data = (run_kind == RUN_DATA) | (run_kind == RUN_COMPRESSED)
    # Grain j of a data run lies at sector + j * grain_size (compressed runs are 1 grain).
    skip = np.where(data, np.maximum(0, -(-(limit - run_sector) // grain_size)), count)
    skip = np.where(run_kind == RUN_ERROR, 0, skip)
    bad = np.flatnonzero(skip < count)
    if not bad.size:
        return None
    i = int(bad[0])
    return int(run_start[i]) + int(skip[i]), int(run_kind[i]) == RUN_ERROR
