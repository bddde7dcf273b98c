"""Vectorised ``layer_runs`` of VMDK (hosted sparse and COWD), VDI, VHD and VHDX on
hostile tables: the same runs as the per-extent path (``layer_extents``), or the same
error (type and message), for random table entries (unallocated, zeroed, past the end
of the file, unaligned, duplicated, reserved states) and random sector bitmaps.

Images start as small ones qemu-img made; entries are poked at their file offsets and
the file is grown (sparse, with scattered data, so that hole probing has work).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import qcowlib
from qcowlib.core.disk import Disk, runs_from_extents
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError
from qcowlib.formats.vhdx.reader import VhdxDisk
from qcowlib.formats.vmdk.reader import open_vmdk
from tests.conftest import qemu_img
from tests.formats import esx_builders as b

pytestmark = pytest.mark.usefixtures("qemu")

MiB = 1 << 20
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", fn())
    except QcowlibError as exc:
        return ("error", type(exc), str(exc))


def _opened(fn: Callable[[], Any]) -> tuple[Any, ...]:
    """``_outcome`` of an open, counted in hypothesis' statistics."""
    got = _outcome(fn)
    event(f"open: {got[0] if got[0] == 'ok' else got[1].__name__}")
    return got


def _both(disk: Disk, a: int, e: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``layer_runs`` and the extent path over ``[a, e)``: their extents or errors."""
    new = _outcome(lambda: list(disk.layer_runs(a, e).extents()))
    old = _outcome(lambda: list(runs_from_extents(disk.layer_extents(a, e - a)).extents()))
    return new, old


def _compare(disk: Disk, windows: list[tuple[int, int]]) -> None:
    size = disk.virtual_size
    for a, n in [(0, size), *windows]:
        a = min(a, size)
        new, old = _both(disk, a, min(size, a + n))
        assert new == old, (a, n)


_WINDOWS = st.lists(
    st.tuples(st.integers(0, 8 * MiB), st.sampled_from([1, 512, 65536, MiB, 3 * MiB])),
    max_size=4,
)


def _grow(raw: bytearray, extra: int, seed: int, tail: bytes = b"") -> bytearray:
    """``raw`` (less ``tail``) grown by ``extra`` bytes of zeros with scattered data."""
    body = raw[: len(raw) - len(tail)] if tail else raw
    base = len(body)
    out = bytearray(body) + bytearray(extra)
    rng = random.Random(seed)
    for _ in range(12):
        at = base + rng.randrange(0, extra - 8192) // 512 * 512
        out[at : at + 4096] = rng.randbytes(4096)
    return out + tail


def _write_sparse(path: Path, raw: bytes | bytearray) -> None:
    """Write ``raw`` leaving its all-zero 4 KiB blocks as holes."""
    zero = bytes(4096)
    with path.open("wb") as f:
        f.truncate(len(raw))
        for at in range(0, len(raw), 4096):
            chunk = raw[at : at + 4096]
            if chunk != zero[: len(chunk)]:
                f.seek(at)
                f.write(chunk)


def _base(tmp_path_factory: pytest.TempPathFactory, fmt: str, *opts: str) -> bytes:
    path = tmp_path_factory.mktemp("hostile-base") / f"base.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *opts, path, "4M")
    return path.read_bytes()


class _Bases(dict[str, bytes]):
    """The base images' bytes (shown by name only in hypothesis' reports)."""

    def __repr__(self) -> str:
        return f"<bases {sorted(self)}>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _Bases(
        {
            "vdi": _base(tmp_path_factory, "vdi"),
            "vpc": _base(tmp_path_factory, "vpc", "-o", "subformat=dynamic,force_size=on"),
            "vhdx": _base(tmp_path_factory, "vhdx", "-o", "block_size=1M"),
            "vmdk": _base(tmp_path_factory, "vmdk"),
        }
    )


# -- VDI ----------------------------------------------------------------------------------
_VDI_ENTRY = st.one_of(
    st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE]), st.integers(0, 5), st.integers(0, 2**32 - 1)
)


@SETTINGS
@given(entries=st.lists(_VDI_ENTRY, min_size=4, max_size=4), windows=_WINDOWS, seed=st.integers())
def test_vdi_block_maps(
    bases: dict[str, bytes], tmp_path: Path, entries: list[int], windows: Any, seed: int
) -> None:
    raw = bytearray(bases["vdi"])
    bmap_at, data_at = struct.unpack_from("<II", raw, 0x154)
    struct.pack_into("<4I", raw, bmap_at, *entries)
    raw = _grow(raw[:data_at], 5 * MiB, seed)
    path = tmp_path / "t.vdi"
    _write_sparse(path, raw)
    opened = _opened(lambda: qcowlib.open(str(path), "vdi"))
    if opened[0] == "ok":
        with opened[1] as disk:
            _compare(disk, windows)


# -- VHD ----------------------------------------------------------------------------------
@SETTINGS
@given(
    entries=st.lists(
        st.one_of(st.none(), st.integers(0, 9 * 2048), st.integers(0, 2**32 - 2)),
        min_size=4,
        max_size=4,
    ),
    bitmaps=st.lists(
        st.one_of(st.sampled_from([b"\xff", b"\x00"]), st.binary(min_size=1, max_size=16)),
        min_size=4,
        max_size=4,
    ),
    differencing=st.booleans(),
    windows=_WINDOWS,
    seed=st.integers(),
)
def test_vhd_bats_and_bitmaps(
    bases: dict[str, bytes],
    tmp_path: Path,
    entries: list[int | None],
    bitmaps: list[bytes],
    differencing: bool,
    windows: Any,
    seed: int,
) -> None:
    raw = bytearray(bases["vpc"])
    (table_at,) = struct.unpack_from(">Q", raw, 512 + 16)
    footer = bytes(raw[-512:])
    raw = _grow(raw, 8 * MiB, seed, footer)
    limit = len(raw) // 512
    for i, (entry, bits) in enumerate(zip(entries, bitmaps, strict=True)):
        value = 0xFFFFFFFF if entry is None else entry
        struct.pack_into(">I", raw, table_at + 4 * i, value)
        if entry is not None and 2048 <= entry < limit - 1:  # a bitmap past the tables
            pattern = (bits * 512)[:512]
            raw[entry * 512 : entry * 512 + 512] = pattern
    path = tmp_path / "t.vhd"
    _write_sparse(path, raw)
    opened = _opened(lambda: qcowlib.open(str(path), "vpc"))
    if opened[0] == "ok":
        with opened[1] as disk:
            disk.differencing = differencing  # parent's runs: unallocated, not zero
            _compare(disk, windows)


# -- VHDX ---------------------------------------------------------------------------------
@SETTINGS
@given(
    # Mostly what a disk without parent may hold (refused states now and then).
    states=st.lists(
        st.one_of(st.sampled_from([0, 2, 3, 6]), st.integers(0, 7)), min_size=4, max_size=4
    ),
    offsets=st.lists(st.one_of(st.integers(2, 11), st.integers(0, 16)), min_size=4, max_size=4),
    partial=st.lists(
        st.one_of(st.none(), st.binary(min_size=1, max_size=8)), min_size=4, max_size=4
    ),
    windows=_WINDOWS,
    seed=st.integers(),
)
def test_vhdx_bats_and_partial_blocks(
    bases: dict[str, bytes],
    tmp_path: Path,
    states: list[int],
    offsets: list[int],
    partial: list[bytes | None],
    windows: Any,
    seed: int,
) -> None:
    raw = bytearray(bases["vhdx"])
    probe = tmp_path / "probe.vhdx"
    probe.write_bytes(raw)
    with VhdxDisk(HostFile(str(probe)), str(probe)) as disk:
        bat_at = disk.bat_region.file_offset
    for i, (state, mib) in enumerate(zip(states, offsets, strict=True)):
        struct.pack_into("<Q", raw, bat_at + 8 * i, (mib << 20) | state)
    raw = _grow(raw, max(0, 12 * MiB - len(raw)) + MiB, seed)
    bits_base = len(raw) - 4096
    for i, bits in enumerate(partial):
        if bits is not None:
            raw[bits_base + 256 * i : bits_base + 256 * (i + 1)] = (bits * 256)[:256]
    path = tmp_path / "t.vhdx"
    _write_sparse(path, raw)
    opened = _opened(lambda: qcowlib.open(str(path), "vhdx"))
    if opened[0] != "ok":
        return
    with opened[1] as disk:
        # A differencing disk's partially present blocks, by their sector bitmaps: the
        # block's state and bitmap offset set as check_differencing_bat leaves them.
        disk._bits_at = np.full(disk._kinds.size, -1, dtype=np.int64)
        for i, bits in enumerate(partial):
            if bits is not None and i < disk._kinds.size:
                disk._kinds[i] = 3  # _KIND_PARTIAL
                disk._bits_at[i] = bits_base + 256 * i
        _compare(disk, windows)


# -- VMDK ---------------------------------------------------------------------------------
_GTE = st.one_of(st.sampled_from([0, 1]), st.integers(0, 40000), st.integers(0, 2**32 - 1))


@SETTINGS
@given(
    gd0=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    gtes=st.dictionaries(st.integers(0, 63), _GTE, max_size=20),
    windows=_WINDOWS,
    seed=st.integers(),
)
def test_vmdk_grain_tables(
    bases: dict[str, bytes],
    tmp_path: Path,
    gd0: int | None,
    gtes: dict[int, int],
    windows: Any,
    seed: int,
) -> None:
    raw = bytearray(bases["vmdk"])
    (gd_sector,) = struct.unpack_from("<Q", raw, 56)
    (gt_sector,) = struct.unpack_from("<I", raw, gd_sector * 512)
    for i, value in gtes.items():
        struct.pack_into("<I", raw, gt_sector * 512 + 4 * i, value)
    if gd0 is not None:
        struct.pack_into("<I", raw, gd_sector * 512, gd0)
    raw = _grow(raw, 16 * MiB, seed)
    path = tmp_path / "t.vmdk"
    _write_sparse(path, raw)
    opened = _opened(lambda: qcowlib.open(str(path), "vmdk"))
    if opened[0] == "ok":
        with opened[1] as disk:
            _compare(disk, windows)


@SETTINGS
@given(
    n=st.integers(1, 9000),
    grains=st.dictionaries(st.integers(0, 8999), st.integers(1, 255), max_size=30),
    gd_entries=st.dictionaries(st.integers(0, 3), st.integers(0, 2**32 - 1), max_size=2),
    windows=_WINDOWS,
)
def test_cowd_grain_maps(
    tmp_path: Path,
    n: int,
    grains: dict[int, int],
    gd_entries: dict[int, int],
    windows: Any,
) -> None:
    picked = {g: bytes([v]) * 512 for g, v in grains.items() if g < n}
    ext = b.cowd(n, picked, gd_entries=gd_entries)
    b.write(tmp_path / "e.bin", ext)
    line = f'RW {n} VMFSSPARSE "e.bin"'
    top = b.write(tmp_path / "d.vmdk", b.descriptor("vmfsSparse", [line]))
    opened = _opened(lambda: open_vmdk(HostFile(str(top)), str(top)))
    if opened[0] == "ok":
        with opened[1] as disk:
            _compare(disk, [(a // 64, w) for a, w in windows])
