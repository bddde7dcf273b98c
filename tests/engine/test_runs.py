"""Run arrays: the vectorised chain map is the extent map, on every fixture and on
random chains; reads driven by runs return the disk's bytes."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.core import runs as runs_module
from qcowlib.core.runs import ChainReader, RunSource, merge_unit_ranges, resolve
from qcowlib.formats.opener import open_disk
from tests.conftest import qemu_img, qemu_io
from tests.fixtures.generate import Fixture


def test_every_fixture_maps_the_same(fixtures: dict[str, Fixture]) -> None:
    for fx in fixtures.values():
        with open_disk(str(fx.path), fx.fmt) as disk:
            assert list(resolve(disk).extents()) == list(disk.extents()), fx.name
            reader = ChainReader(disk)
            n = min(disk.virtual_size, 4 << 20)
            runs, a, b = RunSource(disk).get(0, n)
            buf = bytearray(n)
            reader.read(runs, a, b, 0, memoryview(buf))
            assert bytes(buf) == disk.read(0, n), fx.name


layer = st.tuples(
    st.sampled_from([512, 4096, 65536, 2 << 20]),
    st.integers(3, 8).map(lambda m: m << 20),
    st.lists(
        st.tuples(st.integers(0, 8 << 20), st.integers(1, 300_000), st.integers(0, 3)),
        max_size=12,
    ),
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(layers=st.lists(layer, min_size=1, max_size=3), seed=st.integers(0, 1000))
@pytest.mark.usefixtures("qemu")
def test_random_chains_map_the_same(
    tmp_path_factory: pytest.TempPathFactory,
    layers: list[tuple[int, int, list[tuple[int, int, int]]]],
    seed: int,
) -> None:
    """Layers of different cluster and virtual sizes (a backing may be shorter or longer
    than its overlay) with data, zero and discard writes."""
    tmp = tmp_path_factory.mktemp("chain")
    rng = random.Random(seed)
    prev: Path | None = None
    for depth, (cs, size, writes) in enumerate(layers):
        path = tmp / f"l{depth}.qcow2"
        backing = ["-b", prev.name, "-F", "qcow2"] if prev is not None else []
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", *backing, path,
                 str(size))  # fmt: skip
        # Compressed writes go to unallocated whole clusters only: first, apart.
        compressed: list[str] = []
        cmds: list[str] = []
        taken: set[int] = set()
        for off, length, kind in writes:
            off = off % size // 512 * 512
            length = max(512, min(length, size - off) // 512 * 512)
            clusters = set(range(off // cs, -(-(off + length) // cs)))
            if kind == 3 and not (
                off % cs or length % cs or off + length > size // cs * cs or clusters & taken
            ):
                compressed.append(f"write -c {off} {length}")
                taken |= clusters
                continue
            op = (f"write -P {rng.randrange(1, 255)}", "write -z", "discard", "write -P 7")[kind]
            cmds.append(f"{op} {off} {length}")
        cmds = compressed + cmds
        if cmds:
            qemu_io(path, "qcow2", *cmds)
        prev = path
    assert prev is not None
    with open_disk(str(prev)) as disk:
        assert list(resolve(disk).extents()) == list(disk.extents())
        reader = ChainReader(disk)
        runs, a, b = RunSource(disk).get(0, disk.virtual_size)
        buf = bytearray(disk.virtual_size)
        reader.read(runs, a, b, 0, memoryview(buf))
        assert bytes(buf) == disk.read(0, disk.virtual_size)


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 20)), max_size=30))
def test_merge_unit_ranges(pairs: list[tuple[int, int]]) -> None:
    first = np.array([a for a, _ in pairs], dtype=np.int64)
    end = first + np.array([n for _, n in pairs], dtype=np.int64)
    got_first, got_end = merge_unit_ranges(first, end)
    covered: set[int] = set()
    for a, n in pairs:
        covered.update(range(a, a + n))
    got: set[int] = set()
    for a, e in zip(got_first.tolist(), got_end.tolist(), strict=True):
        got.update(range(a, e))
    assert got == covered
    # Sorted, and separated by at least one unit.
    assert all(e < a for e, a in zip(got_end[:-1].tolist(), got_first[1:].tolist(), strict=True))


def _aliased_vhd(path: Path, sparse: int, dense: int) -> None:
    """A dynamic VHD (2 MiB blocks) written from the spec: ``sparse`` unallocated
    blocks, then ``dense`` BAT entries that all point at one block whose sector bitmap
    alternates (4,096 runs a block from a file of a few MiB)."""

    def checksum(raw: bytearray, at: int) -> int:
        return ~(sum(raw[:at]) + sum(raw[at + 4 :])) & 0xFFFFFFFF

    bs, n = 2 << 20, sparse + dense
    size = n * bs
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">IIQ", footer, 8, 2, 0x10000, 512)
    footer[28:32] = b"qemu"
    footer[36:40] = b"Wi2k"
    struct.pack_into(">QQHBBI", footer, 40, size, size, 65535, 16, 255, 3)
    struct.pack_into(">I", footer, 64, checksum(footer, 64))
    dynamic = bytearray(1024)
    dynamic[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", dynamic, 8, 2**64 - 1, 1536, 0x10000, n, bs)
    struct.pack_into(">I", dynamic, 36, checksum(dynamic, 36))
    bat_len = -(-n * 4 // 512) * 512
    bat = bytearray(b"\xff" * bat_len)
    for i in range(sparse, n):
        struct.pack_into(">I", bat, 4 * i, (1536 + bat_len) // 512)
    block = b"\x55" * 512 + b"\x01" * bs
    path.write_bytes(bytes(footer + dynamic + bat + block + footer))


def test_windows_hold_a_bounded_number_of_runs_on_a_hostile_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window never grows past MAX_WINDOW_RUNS of the chain's shortest run: after a
    long sparse stretch (which grows the window) a dense stretch of aliased blocks with
    alternating bitmaps cannot put more runs than that in one window.  Qcow2 windows
    are bounded by clusters, other formats by sectors."""
    monkeypatch.setattr(runs_module, "MAX_WINDOW_RUNS", 1 << 14)
    img = tmp_path / "aliased.vhd"
    _aliased_vhd(img, 2048, 64)
    with open_disk(str(img)) as disk:
        assert disk.run_granule == 512
        source = RunSource(disk)
        assert source.max_window == (1 << 14) * 512
        most = pos = 0
        while pos < source.size:
            runs, _, _ = source.get(pos, pos + 1)
            most = max(most, len(runs))
            pos = source.hi
        assert 4096 < most <= 1 << 14
    q = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", q, "1G")
    qemu_io(q, "qcow2", "write -P 7 0 1M")
    with open_disk(str(q)) as disk:
        assert disk.run_granule == 4096
        assert RunSource(disk).max_window == (1 << 14) * 4096
