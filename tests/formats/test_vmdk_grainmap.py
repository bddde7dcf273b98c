"""Windowed grain maps (:mod:`qcowlib.formats.vmdk.grainmap`) against the whole map
decoded at once (:func:`qcowlib.formats.vmdk.mapping.table_runs`): random directories
(unallocated, bad, and the same table named again) and tables, windows from one entry
up, directory reads from one entry up, and reads of random sizes driving the windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.core.hostfile import HostFile
from qcowlib.formats.vmdk import mapping
from qcowlib.formats.vmdk.grainmap import Geometry, GrainTables
from qcowlib.formats.vmdk.reader_esx import open_cowd, open_sesparse
from tests.formats import esx_builders as b

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
#: The test format: a directory of uint32 entries at 0 (0: none, 1: bad, t + 2: table t
#: at TABLES + t * gt_bytes) and tables of uint32 entries (0: unallocated, 1: zero,
#: 2: bad, else the grain's sector).
TABLES = 4096
FILE_SIZE = 64 << 10


class _Tables(GrainTables):
    def _directory(self, raw: bytes) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        gd = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        state = np.select([gd == 0, gd == 1], [mapping.GD_UNALLOC, mapping.GD_ERROR], 1)
        offset = TABLES + (gd - 2) * self.geometry.gt_bytes
        return state.astype(np.uint8), np.where(state == mapping.GD_TABLE, offset, 0)

    def _entries(
        self, raw: bytearray, count: int
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        gt = np.frombuffer(raw, dtype="<u4", count=count).astype(np.int64)
        codes = [mapping.RUN_UNALLOC, mapping.RUN_ZERO, mapping.RUN_ERROR]
        kind = np.select([gt == 0, gt == 1, gt == 2], codes, mapping.RUN_DATA)
        return kind.astype(np.uint8), np.where(kind == mapping.RUN_DATA, gt, 0)


@st.composite
def _maps(draw: st.DrawFn) -> tuple[int, int, list[int], list[list[int]], int]:
    gtes = draw(st.sampled_from([1, 2, 4, 8]))
    gs = draw(st.sampled_from([1, 8]))
    n_tables = draw(st.integers(0, 5))
    tables: list[list[int]] = []
    sector = draw(st.integers(3, 50))
    for _ in range(n_tables):
        table = []
        for _ in range(gtes):
            # Mostly data following on (runs that cross table and window edges), some
            # jumps, holes, zeros, bad entries and sectors past the end of the file.
            sector = sector + gs if draw(st.booleans()) else draw(st.integers(3, 160))
            table.append(draw(st.sampled_from([sector, sector, 0, 1, 2])))
        tables.append(table)
    choices = [0, 1, *range(2, n_tables + 2)]
    gd = draw(st.lists(st.sampled_from(choices), max_size=12))
    n_grains = draw(st.integers(0, (len(gd) + 2) * gtes))
    return gtes, gs, gd, tables, n_grains


def _write(path: Path, gd: list[int], tables: list[list[int]], gtes: int) -> HostFile:
    blob = bytearray(FILE_SIZE)
    raw_gd = np.array(gd, dtype="<u4").tobytes()
    blob[: len(raw_gd)] = raw_gd
    for t, table in enumerate(tables):
        at = TABLES + t * gtes * 4
        blob[at : at + gtes * 4] = np.array(table, dtype="<u4").tobytes()
    path.write_bytes(bytes(blob))
    return HostFile(str(path))


def _whole(gtes: int, gs: int, gd: list[int], tables: list[list[int]], n: int) -> mapping.GrainRuns:
    """The map decoded at once, from the drawn values."""
    state = [mapping.GD_UNALLOC if v == 0 else mapping.GD_ERROR if v == 1 else 1 for v in gd]
    entries = [e for v in gd if v >= 2 for e in tables[v - 2]]
    codes = {0: mapping.RUN_UNALLOC, 1: mapping.RUN_ZERO, 2: mapping.RUN_ERROR}
    kinds = [codes.get(e, mapping.RUN_DATA) for e in entries]
    return mapping.table_runs(
        np.array(state, dtype=np.uint8),
        np.array(kinds, dtype=np.uint8),
        np.array([e if e >= 3 else 0 for e in entries], dtype=np.int64),
        gtes=gtes,
        n_grains=n,
        grain_size=gs,
    )


def _rows(runs: mapping.GrainRuns) -> list[tuple[int, int, int, int]]:
    return list(
        zip(
            runs.start.tolist(),
            runs.length.tolist(),
            runs.kind.tolist(),
            runs.sector.tolist(),
            strict=True,
        )
    )


def _merged(rows: list[tuple[int, int, int, int]], gs: int) -> list[tuple[int, int, int, int]]:
    """Neighbouring runs merged as one map would hold them (the definition)."""
    out: list[list[int]] = []
    for start, length, kind, sector in rows:
        if length == 0:
            continue
        if out:
            last = out[-1]
            follows = kind != mapping.RUN_DATA or sector == last[3] + last[1] * gs
            if last[2] == kind and kind != mapping.RUN_COMPRESSED and follows:
                last[1] += length
                continue
        out.append([start, length, kind, sector])
    return [(s, n, k, c) for s, n, k, c in out]


def _walk(
    m: GrainTables, steps: list[int], gd: list[int] | None = None
) -> list[tuple[int, int, int, int]]:
    """Every window from grain 0 on, each asked for by a read of the next step's size
    (and, given the directory ``gd``, each within its budget of table entries)."""
    rows: list[tuple[int, int, int, int]] = []
    grain, i = 0, 0
    while grain < m.n_grains:
        end = min(m.n_grains, grain + steps[i % len(steps)])
        w = m.runs(grain, end)
        assert w.first == grain < w.end <= m.n_grains  # windows tile the extent
        assert w.start[0] == w.first and int(w.start[-1] + w.length[-1]) == w.end
        rows += _rows(w)
        if gd is not None:
            gtes = m.geometry.gtes
            listed = sum(1 for v in gd[w.first // gtes : -(-w.end // gtes)] if v)
            assert listed * gtes <= max(m.window, gtes)
        grain, i = w.end, i + 1
    return rows


@SETTINGS
@given(
    case=_maps(),
    window=st.sampled_from([1, 2, 5, 8, 16, 1 << 18]),
    dir_reads=st.tuples(st.sampled_from([4, 8, 12, 1 << 20]), st.sampled_from([4, 16, 1 << 14])),
    steps=st.lists(st.integers(1, 40), min_size=1, max_size=4),
)
def test_windows_equal_the_whole_map(
    tmp_path: Path,
    case: tuple[int, int, list[int], list[list[int]], int],
    window: int,
    dir_reads: tuple[int, int],
    steps: list[int],
) -> None:
    gtes, gs, gd, tables, n = case
    host = _write(tmp_path / "t.bin", gd, tables, gtes)
    entries = min(len(gd), -(-n // gtes))
    geometry = Geometry(0, entries, 4, gtes, gtes * 4, gs, n, "test grain directory")
    try:
        m = _Tables(host, "t.bin", geometry, strict=False, window=window)
        m.max_directory_read, m.min_directory_read = dir_reads
        whole = _whole(gtes, gs, gd, tables, n)
        assert _merged(_walk(m, steps, gd), gs) == _merged(_rows(whole), gs)
        assert n == 0 or _merged(_rows(whole), gs) == _rows(whole)  # merged in one window
        bad = mapping.first_bad_grain(whole, grain_size=gs, file_size=FILE_SIZE)
        assert m.first_bad(FILE_SIZE) == bad
    finally:
        host.close()


@pytest.mark.parametrize("kind", ["cowd", "sesparse"])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_esx_windows_of_one_table_equal_one_window(
    tmp_path: Path, kind: str, data: st.DataObject
) -> None:
    """COWD and seSparse extents (three tables' worth) mapped a table at a time and in
    one window give the same runs."""
    n = 3 * 4096
    picked = data.draw(st.lists(st.integers(0, n - 1), max_size=20))
    grains: dict[int, bytes | int] = {g: bytes([g % 251]) * 16 for g in picked}
    if kind == "cowd":
        path = b.cowd_layout(n, {g: v for g, v in grains.items() if isinstance(v, bytes)})
    else:
        grains.update(dict.fromkeys(data.draw(st.lists(st.integers(0, n - 1))), b.SE_ZERO))
        path = b.sesparse_layout(n * 8, grains)
    file = path.write(tmp_path / "e.bin")
    opener = open_cowd if kind == "cowd" else open_sesparse
    host = HostFile(str(file))
    try:
        _, one = opener(host, str(file))
        one.window = 1
        _, all_ = opener(host, str(file))
        assert _merged(_walk(one, [n]), one.grain_size) == _rows(all_.runs(0, n))
    finally:
        host.close()
