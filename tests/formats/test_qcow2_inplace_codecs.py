"""Property tests for the pieces behind snapshot, amend, bitmap and dd: the bitmap
directory encoder against the directory parser, bitmap merging against a per-byte model,
amend's and dd's option parsers ("parse or raise QcowlibError")."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import QcowlibError
from qcowlib.formats.qcow2.amend import parse_amend_options
from qcowlib.formats.qcow2.bitmap import bitmap_tables, parse_bitmap_directory
from qcowlib.formats.qcow2.bitmap_rw import _Bitmap, data_size, encode_directory, merge_bits
from qcowlib.formats.qcow2.snapshot import (
    SnapshotEntry,
    encode_snapshot_table,
    parse_snapshot_table,
)
from qcowlib.ops.dd import parse_dd_operands

names = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
    min_size=1,
    max_size=40,
)


@given(
    st.lists(
        st.tuples(names, st.integers(9, 31), st.integers(0, 3), st.integers(1, 1000)),
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_bitmap_directory_round_trip(items: list[tuple[str, int, int, int]]) -> None:
    cs = 65536
    bms = [_Bitmap(n, g, f, (i + 1) * cs, t) for i, (n, g, f, t) in enumerate(items)]
    raw = encode_directory(bms)
    assert len(raw) % 8 == 0
    parsed = parse_bitmap_directory(raw, len(bms))
    assert [(p.name, p.granularity_bits, p.flags) for p in parsed] == [
        (b.name, b.granularity_bits, b.flags) for b in bms
    ]
    places = bitmap_tables(raw, len(bms), cs, 1 << 20)
    assert places == [(b.table_offset, b.table_size) for b in bms]


def _model(target: bytes, tg: int, src: bytes, sg: int, size: int) -> bytes:
    """Per guest byte: a target chunk is set when it was, or when a set source chunk
    covers any byte of it."""
    tbits = np.unpackbits(np.frombuffer(target, np.uint8), bitorder="little")
    sbits = np.unpackbits(np.frombuffer(src, np.uint8), bitorder="little")
    for byte in range(size):
        if sbits[byte >> sg]:
            tbits[byte >> tg] = 1
    return np.packbits(tbits, bitorder="little").tobytes()[: len(target)]


@settings(max_examples=60, deadline=None)
@given(st.integers(9, 13), st.integers(9, 13), st.integers(1, 40_000), st.data())
def test_merge_bits_matches_a_byte_model(tg: int, sg: int, size: int, data: st.DataObject) -> None:
    tn, sn = data_size(size, tg), data_size(size, sg)

    # only bits for chunks inside the disk may be set (as QEMU keeps them)
    def bits_for(n: int, g: int) -> bytes:
        raw = bytearray(data.draw(st.binary(min_size=n, max_size=n)))
        valid = -(-size // (1 << g))
        arr = np.unpackbits(np.frombuffer(bytes(raw), np.uint8), bitorder="little")
        arr[valid:] = 0
        return np.packbits(arr, bitorder="little").tobytes()[:n]

    target, src = bits_for(tn, tg), bits_for(sn, sg)
    got = np.frombuffer(target, np.uint8).copy()
    merge_bits(got, tg, np.frombuffer(src, np.uint8), sg, size)
    assert got.tobytes() == _model(target, tg, src, sg, size)


@given(st.dictionaries(st.sampled_from(["compat", "lazy_refcounts", "refcount_bits", "size",
                                        "cluster_size", "foo", "backing_fmt"]),
                       st.text(max_size=8)))  # fmt: skip
def test_amend_options_parse_or_raise(options: dict[str, str]) -> None:
    try:
        plan = parse_amend_options(options)
    except QcowlibError:
        return
    if plan.refcount_order is not None:
        assert 0 <= plan.refcount_order <= 6


@given(st.lists(st.text(max_size=12), max_size=6))
def test_dd_operands_parse_or_raise(ops: list[str]) -> None:
    try:
        args = parse_dd_operands(ops)
    except QcowlibError:
        return
    assert args.src and args.dst and args.bs >= 1 and args.skip >= 0


@given(st.lists(st.tuples(names, st.integers(0, 2**32 - 1), st.integers(0, 2**63)), max_size=5))
def test_snapshot_table_round_trip(items: list[tuple[str, int, int]]) -> None:
    entries = [
        SnapshotEntry(
            l1_table_offset=65536 * (i + 1),
            l1_size=i,
            id_raw=str(i + 1).encode(),
            name_raw=name.encode(),
            extra_data_size=24,
            vm_state_size=0,
            date_sec=date,
            date_nsec=999_999_000,
            vm_clock_nsec=clock,
            disk_size=1 << 20,
            icount=0,
            unknown_extra_data=b"",
        )
        for i, (name, date, clock) in enumerate(items)
    ]
    parsed = parse_snapshot_table(encode_snapshot_table(entries), len(entries))
    assert [(p.id_str, p.name, p.date_sec, p.vm_clock_nsec, p.icount) for p in parsed] == [
        (e.id_str, e.name, e.date_sec, e.vm_clock_nsec, 0) for e in entries
    ]
