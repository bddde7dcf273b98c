"""The plain (numpy-free) qcow2 check pass against the full check.

:func:`~qcowlib.formats.qcow2.check_small.small_check` may only answer where the full
check (:func:`~qcowlib.formats.qcow2.check.check_image`) finds nothing, and then with
its very report.  Both run here on the qcow2 fixtures (made by qemu-img) and on copies
of them with random bytes poked into their metadata; tests/ops/test_check.py compares
the command line, which goes through the plain pass where it answers, with
``qemu-img check``.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.checkreport import CheckReport
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError
from qcowlib.formats.qcow2.check import check_image
from qcowlib.formats.qcow2.check_small import SMALL_CHECK_ENTRIES, small_check
from qcowlib.formats.qcow2.hostio import read_header
from tests.conftest import have_qemu, qemu_img, qemu_io

if have_qemu():
    from tests.fixtures.generate import ensure_fixtures

    FIXTURES = ensure_fixtures()
    QCOW2 = sorted(n for n, f in FIXTURES.items() if f.fmt == "qcow2")
else:  # pragma: no cover - conftest's require_qemu decides skip or fail
    FIXTURES = {}
    QCOW2 = ["<qemu-img missing>"]

pytestmark = pytest.mark.usefixtures("qemu")

#: Fixtures of the plain kind: the plain pass must answer for them.
PLAIN = (
    "c512-v2",
    "c512-v3-rc64",
    "c4k-v3-rc8",
    "c64k-v3-rc16",
    "c64k-v3-zstd",
    "convert-c-zlib",
    "lazy-refcounts",
    "prealloc-metadata",
    "chain-zero-discard-v3",
)
#: Fixtures the plain pass must leave to the full check.
NOT_PLAIN = ("snapshots-c64k", "bitmaps", "c4k-v3-rc1", "c64k-v3-el2", "dirty-lazy-refcounts")


def _both(path: Path) -> tuple[CheckReport | None, CheckReport] | None:
    """(plain pass, full check) of a file; None when its header does not even parse."""
    host = HostFile(str(path))
    try:
        try:
            header = read_header(host, for_check=True)
        except QcowlibError:
            return None
        return small_check(host, header, "x"), check_image(host, header, "x", 0)
    finally:
        host.close()


@pytest.mark.parametrize("name", QCOW2)
def test_plain_pass_is_the_full_check_where_it_answers(name: str) -> None:
    both = _both(FIXTURES[name].path)
    assert both is not None
    plain, full = both
    if name in PLAIN:
        assert plain is not None
    if name in NOT_PLAIN:
        assert plain is None
    if plain is not None:
        assert plain == full
        assert plain.status == 0 and not plain.messages


def test_large_tables_go_to_the_full_check(tmp_path: Path) -> None:
    path = tmp_path / "wide.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "4G")
    # One 4 KiB L2 table covers 2 MiB: a write every 2 MiB makes one table each.
    tables = SMALL_CHECK_ENTRIES // 512 + 1
    qemu_io(path, "qcow2", *(f"write -P 1 {i * 2}M 4k" for i in range(tables)))
    both = _both(path)
    assert both is not None and both[0] is None and both[1].status == 0


def test_a_large_file_goes_to_the_full_check(tmp_path: Path) -> None:
    path = tmp_path / "long.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "1M")
    with path.open("r+b") as f:
        f.truncate(512 * (SMALL_CHECK_ENTRIES + 1))  # more clusters than the pass counts
    host = HostFile(str(path))
    try:
        assert small_check(host, read_header(host, for_check=True), "x") is None
    finally:
        host.close()


def _metadata_regions(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the header fields, L1 table, L2 tables, refcount table and
    blocks of a clean image (where poking bytes matters)."""
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    cs = 1 << cluster_bits
    l1_size, l1_offset, rt_offset, rt_clusters = struct.unpack_from(">IQQI", data, 36)
    regions = [(20, 52), (l1_offset, l1_size * 8), (rt_offset, rt_clusters * cs)]
    for (entry,) in struct.iter_unpack(">Q", data[l1_offset : l1_offset + l1_size * 8]):
        if entry & 0x00FF_FFFF_FFFF_FE00:
            regions.append((entry & 0x00FF_FFFF_FFFF_FE00, cs))
    reftable = data[rt_offset : rt_offset + rt_clusters * cs]
    for (entry,) in struct.iter_unpack(">Q", reftable):
        if entry:
            regions.append((entry & ~0x1FF, min(cs, 1024)))
    return [(o, n) for o, n in regions if o + n <= len(data)]


POKED = ("convert-c-zlib", "c4k-v3-rc8", "c64k-v3-rc16", "prealloc-metadata", "c512-v2", "c64k-v2")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(POKED),
    pokes=st.lists(
        st.tuples(st.integers(0, 10**6), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_plain_pass_never_passes_a_damaged_image(
    name: str, pokes: list[tuple[int, float, int]]
) -> None:
    data = bytearray(FIXTURES[name].path.read_bytes())
    regions = _metadata_regions(bytes(data))
    for which, where, value in pokes:
        offset, length = regions[which % len(regions)]
        data[offset + int(where * length)] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "poked.qcow2"
        path.write_bytes(data)
        both = _both(path)
    if both is not None and both[0] is not None:
        assert both[0] == both[1]


def test_check_of_a_small_image_with_data_loads_no_numpy(tmp_path: Path) -> None:
    path = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1G")
    qemu_io(path, "qcow2", "write -P 1 0 1M", "write -P 2 600M 64k", "write -z 1M 64k")
    code = (
        "import sys; from qcowlib.ops.check import check; r = check(sys.argv[1]); "
        "assert r.status == 0, r; print('numpy' in sys.modules, 'construct' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
