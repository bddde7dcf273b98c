"""L1/L2 and refcount codecs: round trips against a per-entry model, and bad entries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import CorruptImage
from qcowlib.formats.qcow2 import refcount, tables

KINDS = [tables.KIND_UNALLOCATED, tables.KIND_DATA, tables.KIND_ZERO, tables.KIND_COMPRESSED]


def expand(runs: tables.L2Runs, unit: int) -> list[tuple[int, int, int]]:
    """Per-unit (kind, host, clen) from runs; host advances inside DATA/allocated runs."""
    out: list[tuple[int, int, int]] = []
    for start, count, kind, host, clen in zip(
        runs.start, runs.count, runs.kind, runs.host, runs.clen, strict=True
    ):
        assert start == len(out)
        for i in range(int(count)):
            h = int(host)
            if h and kind != tables.KIND_COMPRESSED:
                h += i * unit
            out.append((int(kind), h, int(clen)))
    return out


@st.composite
def l2_tables(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int]]]:
    cluster_bits = draw(st.integers(9, 21))
    n = draw(st.integers(1, 64))
    model = []
    for _ in range(n):
        kind = draw(st.sampled_from(KINDS))
        if kind == tables.KIND_DATA:
            model.append((kind, draw(st.integers(1, 1 << 30)) << cluster_bits, 0))
        elif kind == tables.KIND_ZERO:
            host = draw(st.sampled_from([0, draw(st.integers(1, 1 << 30)) << cluster_bits]))
            model.append((kind, host, 0))
        elif kind == tables.KIND_COMPRESSED:
            off = draw(st.integers(1, (1 << (62 - (cluster_bits - 8))) - (1 << 22)))
            length = draw(st.integers(1, (1 << cluster_bits) - 512 + 1))
            model.append((kind, off, length))
        else:
            model.append((kind, 0, 0))
    return cluster_bits, model


@given(l2_tables())
@settings(max_examples=300)
def test_l2_round_trip(case: tuple[int, list[tuple[int, int, int]]]) -> None:
    cluster_bits, model = case
    kind = np.array([m[0] for m in model], dtype=np.uint8)
    host = np.array([m[1] for m in model], dtype=np.uint64)
    entries = tables.encode_l2_standard(kind, host)
    comp = kind == tables.KIND_COMPRESSED
    if comp.any():
        layout = tables.CompressedLayout(cluster_bits)
        lengths = np.array([m[2] for m in model], dtype=np.uint64)[comp]
        entries[comp] = layout.encode(host[comp], lengths)
    raw = tables.encode_table(entries)
    decoded = tables.decode_l2(tables.decode_table(raw), cluster_bits=cluster_bits)
    got = expand(decoded, 1 << cluster_bits)
    for (k, h, length), (gk, gh, gl) in zip(model, got, strict=True):
        assert gk == k
        assert gh == h
        if k == tables.KIND_COMPRESSED:
            # descriptors round up to whole sectors: the bound covers the data
            assert length <= gl < length + 512


@given(
    st.integers(9, 16),
    st.integers(1, 6),
    st.integers(1, 32),
    st.lists(st.sampled_from(KINDS[:3]), min_size=1, max_size=192),
    st.booleans(),
)
@settings(max_examples=200)
def test_batched_l2_decode_equals_one_table_at_a_time(
    cluster_bits: int, n_tables: int, per_table: int, kinds: list[int], contiguous: bool
) -> None:
    """Several tables decoded at once give each table's own runs, never one run that
    crosses from one table into the next (contiguous data across the seam included)."""
    n = n_tables * per_table
    kind = np.resize(np.array(kinds, dtype=np.uint8), n)
    cs = 1 << cluster_bits
    if contiguous:  # one long run of host clusters through every table
        host = (np.arange(n, dtype=np.uint64) + 1) * np.uint64(cs)
    else:
        host = np.random.default_rng(n).integers(1, 1 << 20, n).astype(np.uint64) * np.uint64(cs)
    host[kind == tables.KIND_UNALLOCATED] = 0
    entries = tables.encode_l2_standard(kind, host).reshape(n_tables, per_table)
    names = [f"L2 table {i}" for i in range(n_tables)]
    batched = tables.decode_l2_tables(entries, cluster_bits=cluster_bits, tables=names)
    assert len(batched) == n_tables
    for row, got in zip(entries, batched, strict=True):
        one = tables.decode_l2(row, cluster_bits=cluster_bits)
        for field in ("start", "count", "kind", "host", "clen"):
            assert np.array_equal(getattr(got, field), getattr(one, field)), field


def test_batched_l2_decode_names_the_table_at_fault() -> None:
    entries = np.zeros((3, 8), dtype=np.uint64)
    entries[2, 5] = 0x10200 | tables.OFLAG_COPIED
    with pytest.raises(CorruptImage, match="unaligned") as err:
        tables.decode_l2_tables(entries, cluster_bits=16, tables=["L2 table 7", "x", "y"])
    assert err.value.structure == "y" and err.value.field == "entry[5]"


def test_runs_merge_contiguous_data() -> None:
    cs = 65536
    host = np.array([cs * 5, cs * 6, cs * 7, cs * 20, 0, 0], dtype=np.uint64)
    kind = np.array([1, 1, 1, 1, 0, 0], dtype=np.uint8)
    runs = tables.decode_l2(tables.encode_l2_standard(kind, host), cluster_bits=16)
    assert list(runs.start) == [0, 3, 4]
    assert list(runs.count) == [3, 1, 2]


def test_unaligned_l2_entry_is_corrupt() -> None:
    entries = np.array([0x10200 | tables.OFLAG_COPIED], dtype=np.uint64)
    with pytest.raises(CorruptImage, match="unaligned"):
        tables.decode_l2(entries, cluster_bits=16)


def test_unaligned_l1_entry_is_corrupt() -> None:
    with pytest.raises(CorruptImage, match="unaligned"):
        tables.l1_offsets(np.array([0, 0x10400], dtype=np.uint64), 65536)


def test_extended_l2_subclusters() -> None:
    cs_bits = 16
    sc = (1 << cs_bits) // 32
    host = 10 << cs_bits
    entries = np.array([host | tables.OFLAG_COPIED, 0], dtype=np.uint64)
    # cluster 0: subclusters 0-1 data, 2 zero, rest unallocated; cluster 1: sc 5 zero
    bitmaps = np.array([0b11 | (0b100 << 32), (1 << 5) << 32], dtype=np.uint64)
    runs = tables.decode_l2(entries, cluster_bits=cs_bits, bitmaps=bitmaps)
    got = expand(runs, sc)
    assert got[0] == (tables.KIND_DATA, host, 0)
    assert got[1] == (tables.KIND_DATA, host + sc, 0)
    assert got[2] == (tables.KIND_ZERO, host + 2 * sc, 0)
    assert got[3][0] == tables.KIND_UNALLOCATED
    assert got[32 + 5] == (tables.KIND_ZERO, 0, 0)
    bad = np.array([1 | (1 << 32), 0], dtype=np.uint64)
    with pytest.raises(CorruptImage, match="subcluster"):
        tables.decode_l2(entries, cluster_bits=cs_bits, bitmaps=bad)


@given(st.integers(0, 6), st.integers(9, 16), st.integers(0, 2**32 - 1))
@settings(max_examples=200)
def test_refcount_block_round_trip(order: int, cluster_bits: int, seed: int) -> None:
    n = refcount.entries_per_block(cluster_bits, order)
    rng = np.random.default_rng(seed)
    top = refcount.max_refcount(order)
    values = rng.integers(0, top, size=n, dtype=np.uint64, endpoint=True)
    raw = refcount.encode_block(values, order)
    assert len(raw) == 1 << cluster_bits
    assert np.array_equal(refcount.decode_block(raw, order), values)


def test_refcount_packing_matches_qemu_bit_order() -> None:
    # QEMU's get_refcount_ro0: bit (i % 8) of byte i // 8
    raw = bytes([0b0000_0101]) + bytes(511)
    assert list(refcount.decode_block(raw, 0)[:4]) == [1, 0, 1, 0]
    # ro2: low nibble first
    raw = bytes([0x3A]) + bytes(511)
    assert list(refcount.decode_block(raw, 2)[:2]) == [0xA, 0x3]
