"""Codecs of the ESXi VMDK variants: COWD and seSparse headers, grain map entries, runs,
and QEMU's extent-line matching, as properties ("parse or raise QcowlibError", equal to
a per-grain model, equal to the C library's own ``sscanf``)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError
from qcowlib.formats.vmdk import cowd, mapping, sesparse
from qcowlib.formats.vmdk.descriptor import parse_descriptor, qemu_extents
from qcowlib.formats.vmdk.extent_lines import scan_extent_line
from qcowlib.formats.vmdk.reader import open_vmdk
from tests.formats import esx_builders as b

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=600), st.integers(0, 1 << 40))
def test_cowd_header_parses_or_raises(data: bytes, size: int) -> None:
    try:
        h = cowd.parse_cowd_header(b"COWD" + data, size)
    except QcowlibError:
        return
    assert 1 <= h.granularity <= cowd.COWD_GRANULARITY_MAX
    start, length = h.gd_range
    assert h.l1dir_size == 0 or start + length <= size


@FAST
@given(st.binary(min_size=0, max_size=1100), st.integers(0, 1 << 40), st.booleans())
def test_sesparse_headers_parse_or_raise(data: bytes, size: int, valid_start: bool) -> None:
    if valid_start:  # past the magic and fixed fields, so later checks are reached
        data = struct.pack("<6Q", 0xCAFEBABE, 0x200000001, 0, 8, 64, 0) + data[48:]
    try:
        h = sesparse.parse_const_header(data, size)
    except QcowlibError:
        pass
    else:
        start, length = h.gd_range
        assert start + length <= size and h.num_gd_entries <= cowd.VMDK_L1_SIZE_MAX
    with contextlib.suppress(QcowlibError):
        sesparse.parse_volatile_header(data[512:])


def test_cowd_header_round_trip() -> None:
    h = cowd.CowdHeader(1, 3, 8192, 1, 4, 2)
    assert cowd.parse_cowd_header(cowd.build_cowd_header(h), 1 << 20) == h


def test_sesparse_headers_round_trip() -> None:
    h = sesparse.SeSparseConstHeader(capacity=2048, volatile_header_offset=1, grain_dir_offset=2)
    h = sesparse.SeSparseConstHeader(**{**h.__dict__, "grain_dir_size": 1})
    assert sesparse.parse_const_header(sesparse.build_const_header(h), 4096) == h
    v = sesparse.SeSparseVolatileHeader(free_gt_number=3)
    assert sesparse.parse_volatile_header(sesparse.build_volatile_header(v)) == v


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_TOKENS = ["RW", "RDONLY", "FLAT", "VMFS", "SESPARSE", "VMFSSPARSEX", "12", "-3", "+7", "0"]
_TOKENS += ['"', '"a b"', '"x.vmdk"', " ", "  ", "\n", "\r\n", "\t", "99999999999999999999"]
_TOKENS += ["a" * 12, "x", "=", "#"]
_LINE = st.lists(st.sampled_from(_TOKENS), max_size=14).map("".join)


def _c_scan(text: str) -> tuple[int | bytes, ...]:
    access, etype, name = (ctypes.create_string_buffer(n) for n in (11, 11, 512))
    sectors, offset = ctypes.c_int64(), ctypes.c_int64()
    n = _LIBC.sscanf(
        text.encode(),
        b'%10s %ld %10s "%511[^\n\r"]" %ld',
        access,
        ctypes.byref(sectors),
        etype,
        name,
        ctypes.byref(offset),
    )
    return max(n, 0), access.value, sectors.value, etype.value, name.value, offset.value


@settings(max_examples=500, deadline=None)
@given(_LINE)
@example('RW 100 SPARSE "file.vmdk\n')  # no closing quote: sscanf still assigns the name
@example('RW 100 VMFS "file.vmdk')
@example('RW 100 FLAT "' + "a" * 600 + '" 0')  # longer than %511
@example('RW 100 FLAT "x.img" 7')
def test_extent_line_matching_equals_sscanf(text: str) -> None:
    c = _c_scan(text)
    m = scan_extent_line(text, 0)
    assert m.matched == c[0]
    ours = (m.access, m.sectors, m.type, m.name, m.offset)
    for i in range(m.matched):
        want = c[1 + i]
        assert ours[i] == (want.decode() if isinstance(want, bytes) else want)


@FAST
@given(st.lists(_LINE, max_size=8).map("\n".join))
def test_qemu_extents_never_raise(text: str) -> None:
    found, problem = qemu_extents(text)
    assert all(e.access == "RW" and e.sectors and e.sectors > 0 for e in found)
    assert problem is None or problem[0] >= 1
    parse_descriptor(text.encode())


def _model_runs(
    state: list[int], kinds: list[int], sectors: list[int], gtes: int, n: int
) -> list[tuple[int, int]]:
    """Per grain: (kind, sector), the slow way."""
    out: list[tuple[int, int]] = []
    for g in range(n):
        i = g // gtes
        if i >= len(state) or state[i] == mapping.GD_ERROR:
            out.append((mapping.RUN_ERROR, 0))
        elif state[i] == mapping.GD_UNALLOC:
            out.append((mapping.RUN_UNALLOC, 0))
        else:
            t = sum(1 for s in state[:i] if s == mapping.GD_TABLE)
            k = kinds[t * gtes + g % gtes]
            out.append((k, sectors[t * gtes + g % gtes] if k == mapping.RUN_DATA else 0))
    return out


@FAST
@given(st.data())
def test_table_runs_equal_per_grain_model(data: st.DataObject) -> None:
    gtes = data.draw(st.sampled_from([1, 2, 4]))
    gs = data.draw(st.sampled_from([1, 8]))
    state = data.draw(st.lists(st.sampled_from([0, 1, 2]), max_size=6))
    k = state.count(mapping.GD_TABLE)
    kinds = data.draw(st.lists(st.sampled_from([0, 1, 2, 4]), min_size=k * gtes, max_size=k * gtes))
    sectors = data.draw(st.lists(st.integers(2, 40), min_size=k * gtes, max_size=k * gtes))
    n = data.draw(st.integers(0, (len(state) + 1) * gtes))
    runs = mapping.table_runs(
        np.array(state, dtype=np.uint8),
        np.array(kinds, dtype=np.uint8),
        np.array(sectors, dtype=np.int64),
        gtes=gtes,
        n_grains=n,
        grain_size=gs,
    )
    assert _per_grain(runs, gs) == _model_runs(state, kinds, sectors, gtes, n)


def _per_grain(runs: mapping.GrainRuns, gs: int) -> list[tuple[int, int]]:
    """Runs expanded to (kind, sector) per grain (checking that they tile the range)."""
    ends = (runs.start + runs.length).tolist()
    assert runs.start.tolist() == [runs.first, *ends[:-1]] and ends[-1] == runs.end
    got: list[tuple[int, int]] = []
    for length, kind, sector in zip(
        runs.length.tolist(), runs.kind.tolist(), runs.sector.tolist(), strict=True
    ):
        for j in range(length):
            got.append((kind, sector + j * gs if kind == mapping.RUN_DATA else 0))
    return got


def _decode_one(e: int, grains_offset: int) -> tuple[int, int]:
    top = e >> 60
    if e == 0:
        return mapping.RUN_UNALLOC, 0
    if top in (1, 2):
        return mapping.RUN_ZERO, 0
    if top == 3:
        cluster = ((e >> 48) & 0xFFF) | ((e & 0xFFFFFFFFFFFF) << 12)
        return mapping.RUN_DATA, grains_offset + min(cluster, 1 << 50) * 8
    return mapping.RUN_ERROR, 0


@FAST
@given(
    st.lists(
        st.one_of(
            st.integers(0, (1 << 64) - 1),
            st.integers(0, (1 << 40)).map(lambda c: 0x3000000000000000 | c),
            st.sampled_from([0, b.SE_ZERO, b.SE_UNMAPPED, 5]),
        ),
        max_size=40,
    ),
    st.integers(0, 1 << 30),
)
def test_sesparse_entries_equal_per_entry_decode(entries: list[int], grains_offset: int) -> None:
    h = sesparse.SeSparseConstHeader(grains_offset=grains_offset)
    kind, sector = sesparse.grain_entries(np.array(entries, dtype=np.uint64), h)
    assert list(zip(kind.tolist(), sector.tolist(), strict=True)) == [
        _decode_one(e, grains_offset) for e in entries
    ]


@pytest.mark.parametrize("kind", ["cowd", "sesparse"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_extents_read_as_model(tmp_path: Path, kind: str, data: st.DataObject) -> None:
    """Random grains written by the test builder read back as the model says."""
    grain = 512 if kind == "cowd" else 4096
    n = data.draw(st.integers(1, 5000 if kind == "cowd" else 9000))
    picked = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 3), max_size=12))
    grains: dict[int, bytes | int] = {}
    model = bytearray(n * grain)
    for g, v in picked.items():
        if v == 0 and kind == "sesparse":
            grains[g] = b.SE_ZERO
        else:
            blob = bytes([v + 1]) * grain
            grains[g] = blob
            model[g * grain : (g + 1) * grain] = blob
    sectors = n * grain // 512
    if kind == "cowd":
        ext = b.cowd(sectors, {g: v for g, v in grains.items() if isinstance(v, bytes)})
        line, ct = f'RW {sectors} VMFSSPARSE "e.bin"', "vmfsSparse"
    else:
        ext = b.sesparse(sectors, grains)
        line, ct = f'RW {sectors} SESPARSE "e.bin"', "seSparse"
    b.write(tmp_path / "e.bin", ext)
    top = b.write(tmp_path / "d.vmdk", b.descriptor(ct, [line]))
    with open_vmdk(HostFile(str(top)), str(top)) as d:
        assert d.read(0, d.virtual_size) == bytes(model)


_SEEDS = {
    "cowd": b.cowd(
        9000, {0: b"\x11" * 512, 4097: b"\x22" * 512}, text=b"CID=00000001\nparentCID=ffffffff\n"
    ),
    "sesparse": b.sesparse(70000, {0: b"\x33" * 4096, 1: b.SE_ZERO, 4200: b"\x44" * 4096}),
}


@pytest.mark.parametrize("kind", sorted(_SEEDS))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pokes=st.lists(st.tuples(st.integers(0, 40_000), st.binary(min_size=1, max_size=8)), max_size=6)
)
def test_damaged_extents_open_or_raise(
    tmp_path: Path, kind: str, pokes: list[tuple[int, bytes]]
) -> None:
    """Mutated COWD and seSparse extents: open, map, read and check, or raise
    QcowlibError; never another exception, never unbounded work."""
    from qcowlib.formats.vmdk.check import check_file

    blob = bytearray(_SEEDS[kind])
    for at, data in pokes:
        blob[at : at + len(data)] = data
    ext = b.write(tmp_path / "e.bin", bytes(blob))
    top = ext
    if kind == "sesparse":
        top = b.write(tmp_path / "d.vmdk", b.descriptor("seSparse", ['RW 8 SESPARSE "e.bin"']))
    try:
        with open_vmdk(HostFile(str(top)), str(top)) as d:
            for n, _ in enumerate(d.extents()):
                assert n < 100_000
            d.read(0, min(d.virtual_size, 1 << 20))
    except QcowlibError:
        pass
    with contextlib.suppress(QcowlibError):
        check_file(HostFile(str(top)), str(top), 0, open_vmdk)
