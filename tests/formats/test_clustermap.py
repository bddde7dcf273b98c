"""The cluster-map machinery the QED, qcow (v1) and Parallels readers share, against
models: runs merged with array operations against a cluster-by-cluster merge, tables
decoded whole against ``struct``, several tables classified at once against one at a
time, error offsets against the header layouts."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.core.disk import RUN_COMPRESSED, RUN_DATA, RUN_UNALLOCATED, RUN_ZERO
from qcowlib.errors import CorruptImage, QcowlibError, TruncatedImage
from qcowlib.formats._clustercodec import bad_entry, decode_entries
from qcowlib.formats._clustermap import ClusterMap, cluster_runs
from qcowlib.formats.parallels import codec as prl
from qcowlib.formats.qcow import codec as qcow
from qcowlib.formats.qed import codec as qed

CS = 4096


def model_runs(
    first: int, end: int, clusters: dict[int, tuple[int, int, int]]
) -> list[tuple[int, ...]]:
    """Runs of clusters ``[first, end)`` merged one cluster at a time (the definition)."""
    runs: list[list[int]] = []
    for c in range(first, end):
        kind, host, clen = clusters.get(c, (RUN_UNALLOCATED, -1, 0))
        if kind == RUN_UNALLOCATED:
            host, clen = -1, 0
        if runs:
            r = runs[-1]
            last_host = r[3] + (r[1] - 1) * CS
            same = r[2] == kind and kind != RUN_COMPRESSED
            if same and (kind != RUN_DATA or host == last_host + CS):
                r[1] += 1
                continue
        runs.append([c, 1, kind, host, clen])
    return [tuple(r) for r in runs]


@st.composite
def cluster_maps(draw: st.DrawFn) -> tuple[int, int, dict[int, tuple[int, int, int]]]:
    first = draw(st.integers(0, 100))
    span = draw(st.integers(1, 48))
    listed = draw(st.lists(st.integers(first, first + span - 1), unique=True, max_size=span))
    clusters: dict[int, tuple[int, int, int]] = {}
    host = draw(st.integers(1, 64)) * CS
    for c in sorted(listed):
        kind = draw(st.sampled_from([RUN_UNALLOCATED, RUN_DATA, RUN_ZERO, RUN_COMPRESSED]))
        # Mostly contiguous host offsets, sometimes a jump: both merge rules get exercised.
        host = host + CS if draw(st.booleans()) else draw(st.integers(1, 1 << 20)) * CS
        h = host if kind in (RUN_DATA, RUN_COMPRESSED) else -1
        clen = draw(st.integers(1, CS)) if kind == RUN_COMPRESSED else 0
        clusters[c] = (kind, h, clen)
    return first, first + span, clusters


def as_map(first: int, end: int, clusters: dict[int, tuple[int, int, int]]) -> ClusterMap:
    idx = sorted(clusters)
    return ClusterMap(
        first,
        end,
        np.array(idx, dtype=np.int64),
        np.array([clusters[c][0] for c in idx], dtype=np.uint8),
        np.array([clusters[c][1] for c in idx], dtype=np.int64),
        np.array([clusters[c][2] for c in idx], dtype=np.int64),
    )


@given(cluster_maps())
@settings(max_examples=400)
def test_cluster_runs_merge_as_the_cluster_by_cluster_model(
    case: tuple[int, int, dict[int, tuple[int, int, int]]],
) -> None:
    first, end, clusters = case
    got = cluster_runs(as_map(first, end, clusters), CS)
    rows = list(zip(*(a.tolist() for a in got), strict=True))
    assert rows == model_runs(first, end, clusters)


@given(cluster_maps(), st.data())
@settings(max_examples=200)
def test_a_window_of_a_map_is_the_map_of_the_window(
    case: tuple[int, int, dict[int, tuple[int, int, int]]], data: st.DataObject
) -> None:
    first, end, clusters = case
    a = data.draw(st.integers(first, end - 1))
    b = data.draw(st.integers(a + 1, end))
    part = as_map(first, end, clusters).within(a, b)
    got = cluster_runs(part, CS)
    inside = {c: v for c, v in clusters.items() if a <= c < b}
    assert list(zip(*(x.tolist() for x in got), strict=True)) == model_runs(a, b, inside)


@given(
    st.binary(max_size=200),
    st.sampled_from(["<u8", ">u8", "<u4", ">u4"]),
    st.integers(-1, 30),
    st.integers(0, 1 << 40),
)
@settings(max_examples=300)
def test_decode_entries_is_struct_or_raises(raw: bytes, dtype: str, count: int, at: int) -> None:
    code = {"u8": "Q", "u4": "I"}[dtype[1:]]
    try:
        got = decode_entries(raw, count, dtype, "some table", at)
    except TruncatedImage as exc:
        assert exc.offset == at
        assert count < 0 or count * struct.calcsize(code) > len(raw)
        return
    assert got.dtype.isnative
    assert got.tolist() == list(struct.unpack_from(f"{dtype[0]}{count}{code}", raw))


@given(st.lists(st.booleans(), min_size=1, max_size=64), st.integers(1, 4), st.integers(0, 100))
def test_bad_entry_names_the_first_bad_entry_of_its_table(
    flags: list[bool], tables: int, first: int
) -> None:
    per = len(flags)
    bad = np.array(flags * tables, dtype=np.bool_).reshape(tables, per)
    bad[:-1] = False  # only the last table is bad
    entries = np.arange(tables * per, dtype=np.uint64).reshape(tables, per)
    offsets = [1000 * (t + 1) for t in range(tables)]
    err = bad_entry(bad, entries, offsets, "t", "entry {i} is {v}", 8, first)
    if not any(flags):
        assert err is None
        return
    j = flags.index(True)
    assert isinstance(err, CorruptImage)
    assert err.field == f"entry[{first + j}]" and err.offset == offsets[-1] + 8 * j
    assert str(err).startswith(f"entry {first + j} is {(tables - 1) * per + j}")


QED_H = qed.parse_header(
    qed.QED_MAGIC + struct.pack("<III3QQQII", 4096, 2, 1, 0, 0, 0, 4096, 1 << 24, 0, 0),
    1 << 20,
)
QCOW_H = qcow.QcowHeader(0, 0, 0, 1 << 30, 12, 6, 0, 48)


def _tables(seed: int, k: int, n: int, bad_rate: float, compressed: bool) -> np.ndarray:
    """``k`` tables of ``n`` entries: unallocated, zero, cluster offsets, compressed
    entries and, at ``bad_rate``, arbitrary 64-bit values."""
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, 4 if compressed else 3, size=(k, n))
    values = np.where(choice == 1, 1, 0).astype(np.uint64)
    values[choice == 2] = rng.integers(0, 255, int((choice == 2).sum())).astype(np.uint64) * 4096
    values[choice == 3] = rng.integers(0, 1 << 20, int((choice == 3).sum())).astype(
        np.uint64
    ) | np.uint64(qcow.QCOW_OFLAG_COMPRESSED)
    garbage = rng.random((k, n)) < bad_rate
    values[garbage] = rng.integers(0, 1 << 63, int(garbage.sum()), dtype=np.uint64)
    return values


def _classify_each(classify: Any, tables: np.ndarray, offsets: list[int]) -> Any:
    """One table at a time (the small path), results stacked, or the first error."""
    out = []
    for t, off in zip(tables, offsets, strict=True):
        try:
            out.append(classify(t, off))
        except QcowlibError as exc:
            return (type(exc), exc.field, exc.offset, str(exc))
    return tuple(np.stack(parts) for parts in zip(*out, strict=True))


def _classify_all(classify: Any, tables: np.ndarray, offsets: list[int]) -> Any:
    try:
        return classify(tables, offsets)
    except QcowlibError as exc:
        return (type(exc), exc.field, exc.offset, str(exc))


def _same(a: Any, b: Any) -> None:
    assert type(a[0]) is type(b[0])
    if isinstance(a[0], np.ndarray):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    else:
        assert a == b


tables_args = (
    st.integers(0, 2**32),
    st.integers(1, 4),
    st.sampled_from([0.0, 0.0005, 0.01]),
)


@given(*tables_args)
@settings(max_examples=100)
def test_qed_tables_classified_together_as_one_at_a_time(seed: int, k: int, rate: float) -> None:
    tables = _tables(seed, k, QED_H.table_nelems, rate, compressed=False)
    offsets = [8192 * (t + 1) for t in range(k)]

    def classify(t: Any, off: Any) -> Any:
        return qed.classify_l2(QED_H, t, off)

    _same(_classify_each(classify, tables, offsets), _classify_all(classify, tables, offsets))


@given(*tables_args)
@settings(max_examples=100)
def test_qcow_tables_classified_together_as_one_at_a_time(seed: int, k: int, rate: float) -> None:
    tables = _tables(seed, k, QCOW_H.l2_size, rate, compressed=True)
    offsets = [4096 * (t + 1) for t in range(k)]

    def classify(t: Any, off: Any) -> Any:
        return qcow.classify_l2(QCOW_H, t, off, 1 << 20)

    _same(_classify_each(classify, tables, offsets), _classify_all(classify, tables, offsets))


@given(st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=64), st.integers(0, 1000))
def test_parallels_bat_lists_the_allocated_clusters(bat: list[int], first: int) -> None:
    h = prl.ParallelsHeader(prl.HEADER_MAGIC2, 16, 1, 8, 4096, 1 << 20, 0, 1, 0, 0)
    size = 1 << 24
    arr = np.array(bat, dtype=np.uint32)
    try:
        index, host = prl.classify_bat(h, arr, size, first)
    except CorruptImage as exc:
        j = next(i for i, e in enumerate(bat) if e * 8 * 512 > size)
        assert exc.field == f"entry[{first + j}]"
        assert exc.offset == prl.HEADER_SIZE + 4 * (first + j)
        return
    want = [(first + i, e * 8 * 512) for i, e in enumerate(bat) if e]
    assert list(zip(index.tolist(), host.tolist(), strict=True)) == want


@pytest.mark.parametrize("layout", [qed.HEADER, qcow.HEADER, prl.HEADER], ids=lambda x: x.what)
def test_field_offsets_are_where_the_layout_puts_the_fields(layout: Any) -> None:
    values = {}
    for i, (name, code) in enumerate(layout.fields):
        values[name] = bytes([0x41 + i]) * int(code[:-1]) if code.endswith("s") else i + 1
    raw = layout.build(values)
    for name, code in layout.fields:
        at = layout.offset_of(name)
        size = struct.calcsize(layout.byteorder + code)
        (got,) = struct.unpack_from(layout.byteorder + code, raw, at)
        assert got == values[name] and at + size <= layout.sizeof()
