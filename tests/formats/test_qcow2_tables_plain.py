"""The plain-Python table codecs against the numpy ones: arbitrary tables, hostile
entries included, give the same runs or raise the same error.

The numpy codecs (:mod:`qcowlib.formats.qcow2.tables`, ``refcount``) are the oracle;
they are compared with qemu-img's own maps elsewhere (tests/test_interop.py).  Neither
decoder takes the image's version: QEMU honours the zero flag in v2 and v3 images alike
(``qcow2_get_cluster_type``), so v2 and v3 differ here only in what entries they hold,
and the reader-level tests (test_qcow2_reader_plain.py) map images of both.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import QcowlibError
from qcowlib.formats.qcow2 import entries, refcount, tables, tables_plain
from qcowlib.formats.qcow2.metadata_read import Qcow2Metadata
from tests.formats.qcow2_entries import l2_tables


def _error(exc: QcowlibError) -> tuple[object, ...]:
    return type(exc), str(exc), exc.structure, exc.field, exc.offset, exc.file


def _numpy(
    raw: bytes, cluster_bits: int, extended: bool, has_data_file: bool
) -> tuple[object, ...]:
    words = tables.decode_table(raw)
    try:
        runs = tables.decode_l2(
            words[0::2] if extended else words,
            cluster_bits=cluster_bits,
            bitmaps=words[1::2] if extended else None,
            has_data_file=has_data_file,
            table="L2 table 3",
        )
    except QcowlibError as exc:
        return _error(exc)
    return tuple(getattr(runs, f).tolist() for f in ("start", "count", "kind", "host", "clen"))


def _plain(
    raw: bytes, cluster_bits: int, extended: bool, has_data_file: bool
) -> tuple[object, ...]:
    try:
        runs = tables_plain.decode_l2_plain(
            raw,
            cluster_bits=cluster_bits,
            extended=extended,
            has_data_file=has_data_file,
            table="L2 table 3",
        )
    except QcowlibError as exc:
        return _error(exc)
    return (runs.start, runs.count, runs.kind, runs.host, runs.clen)


@given(l2_tables())
@settings(max_examples=600, deadline=None)
def test_plain_l2_decode_equals_numpy(case: tuple[bytes, int, bool, bool]) -> None:
    raw, cluster_bits, extended, has_data_file = case
    assert _plain(raw, cluster_bits, extended, has_data_file) == _numpy(
        raw, cluster_bits, extended, has_data_file
    )


@pytest.mark.parametrize("cluster_bits", [9, 16, 21])
@pytest.mark.parametrize("extended", [False, True])
def test_plain_l2_decode_of_whole_tables(cluster_bits: int, extended: bool) -> None:
    """Whole tables of every size: sparse, full of contiguous data, and a misaligned
    entry at the very end (the error names it)."""
    cs = 1 << cluster_bits
    n = cs // (16 if extended else 8)
    rng = np.random.default_rng(cluster_bits)
    full = (np.arange(n, dtype=np.uint64) + 1) * np.uint64(cs) | np.uint64(entries.OFLAG_COPIED)
    sparse = np.where(rng.random(n) < 0.01, full, np.uint64(0))
    bad = full.copy()
    bad[-1] |= np.uint64(512 if cs > 512 else 0)
    for table in (sparse, full, bad):
        if extended:
            both = np.zeros(2 * n, dtype=np.uint64)
            both[0::2] = table
            both[1::2] = np.where(table != 0, np.uint64(0xFFFF_FFFF), np.uint64(0))
            table = both
        raw = tables.encode_table(table)
        assert _plain(raw, cluster_bits, extended, False) == _numpy(
            raw, cluster_bits, extended, False
        )


def test_plain_l2_errors_in_the_numpy_order() -> None:
    """With extended L2, an unaligned cluster is reported before a compressed cluster
    with a bitmap, and that before an invalid bitmap, wherever each is in the table."""
    cb = 16
    invalid = (0x10000, 0x1 | (0x1 << 32))  # a subcluster allocated and zero
    compressed = (entries.OFLAG_COMPRESSED | 0x1234, 1)
    unaligned = (0x10200 | entries.OFLAG_COPIED, 0xFFFF_FFFF)
    cases = [
        ([invalid, compressed, unaligned], "unaligned", "entry[2]"),
        ([invalid, compressed], "compressed cluster", "entry[1]"),
        ([invalid, invalid], "invalid subcluster bitmap", "entry[0]"),
    ]
    for pairs, words, field in cases:
        raw = struct.pack(f">{2 * len(pairs)}Q", *[w for p in pairs for w in p])
        got = _plain(raw, cb, True, False)
        assert got == _numpy(raw, cb, True, False)
        assert words in str(got[1]) and got[3] == field


@given(st.lists(st.integers(0, 2**64 - 1), max_size=40), st.integers(9, 21))
@settings(max_examples=300)
def test_plain_l1_check_equals_numpy(l1: list[int], cluster_bits: int) -> None:
    raw = struct.pack(f">{len(l1)}Q", *l1)
    cs = 1 << cluster_bits
    try:
        tables.l1_offsets(tables.decode_table(raw), cs)
        want: object = None
    except QcowlibError as exc:
        want = _error(exc)
    try:
        tables_plain.l1_check_aligned(raw, cs)
        got: object = None
    except QcowlibError as exc:
        got = _error(exc)
    assert got == want


@given(st.integers(0, 6), st.integers(9, 16), st.integers(0, 2**32 - 1), st.data())
@settings(max_examples=300)
def test_plain_refcount_count_equals_numpy(
    order: int, cluster_bits: int, seed: int, data: st.DataObject
) -> None:
    """The non-zero refcounts among a block's first ``n``, any width (sub-byte ones
    packed least-significant bits first)."""
    cs = 1 << cluster_bits
    rng = np.random.default_rng(seed)
    raw = bytes(rng.integers(0, 256, cs, dtype=np.uint8) * (rng.random(cs) < 0.3))
    per_block = refcount.entries_per_block(cluster_bits, order)
    n = data.draw(st.integers(0, per_block))
    want = int(np.count_nonzero(refcount.decode_block(raw, order)[:n]))
    assert tables_plain.count_refcounts(raw, order, n) == want


class _File:
    """A file of ``data`` for the metadata reader (``pread_exact`` only)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        return self.data[offset : offset + length]


@given(st.lists(st.integers(0, 2**64 - 1), max_size=40), st.integers(9, 21))
@settings(max_examples=300)
def test_plain_reftable_offsets_equal_the_reader(reftable: list[int], cluster_bits: int) -> None:
    """Refcount block offsets as ``Qcow2Metadata.refcount_table`` reads them, or its
    error for the first unaligned one."""
    cs = 1 << cluster_bits
    raw = struct.pack(f">{len(reftable)}Q", *reftable).ljust(
        cs * (1 + 8 * len(reftable) // cs), b"\0"
    )
    disk = SimpleNamespace(
        host=_File(raw),
        header=SimpleNamespace(refcount_table_offset=0, refcount_table_clusters=len(raw) // cs),
        cluster_size=cs,
        filename="t.qcow2",
    )
    try:
        want: object = Qcow2Metadata.refcount_table(disk).tolist()  # type: ignore[arg-type]
    except QcowlibError as exc:
        want = _error(exc.with_file("t.qcow2"))
    try:
        got: object = tables_plain.reftable_offsets(raw, cs).tolist()
    except QcowlibError as exc:
        got = _error(exc.with_file("t.qcow2"))
    assert got == want
