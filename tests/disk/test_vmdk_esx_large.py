"""ESXi sparse extents of the size real snapshot deltas reach, read as qemu-img 7.2 reads
them: a COWD (vmfsSparse) delta and a seSparse extent whose grain tables hold more than
16 Mi entries (more than qcowlib once mapped at all), and a directory that names one
table thousands of times, mapped a window at a time in bounded memory.

The extents are sparse files (a few MiB on disk for 8 or 64 GiB of capacity) built by
:mod:`tests.formats.esx_builders`; the oracle is qemu-img on the same files
(``convert -O raw`` compared byte for byte, ``map --output json`` equal).  qemu-img maps
these a grain at a time (some 6 s for ``convert`` of 16 Mi grains), so each case runs
the four commands side by side.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from qcowlib.core.disk import ExtentKind
from qcowlib.core.hostfile import HostFile
from qcowlib.formats.vmdk.reader import open_vmdk
from tests.conftest import cli, qemu_img
from tests.formats import esx_builders as b

pytestmark = pytest.mark.usefixtures("qemu")

#: Grain tables of the large extents: one more than the 16 Mi entries (4096 tables of
#: 4096) qcowlib mapped at most before it read them a window at a time.
TABLES = 4097
#: Tables per window of 256 Ki entries: the data runs below cross their edges.
WINDOW_TABLES = 64


def _large(d: Path, kind: str) -> Path:
    """A grain in every table, runs of data across table and window edges, and (seSparse)
    zeroed and unmapped grains; grains are laid out in the order written."""
    rng = random.Random(TABLES)
    size = 512 if kind == "cowd" else 4096
    grains: dict[int, bytes | int] = {}
    for t in range(TABLES):
        grains[t * 4096 + rng.randrange(4096)] = rng.randbytes(size)
    for t in (1, WINDOW_TABLES - 1, WINDOW_TABLES, WINDOW_TABLES + 1, 2048, TABLES - 1):
        for g in range(t * 4096 - 3, t * 4096 + 3):  # six grains at consecutive sectors
            grains.pop(g, None)
            grains[g] = rng.randbytes(size)
    if kind == "cowd":
        cap = TABLES * 4096
        data = {g: v for g, v in grains.items() if isinstance(v, bytes)}
        b.cowd_layout(cap, data).write(d / "snap-delta.vmdk")
        line, create_type = f'RW {cap} VMFSSPARSE "snap-delta.vmdk"', "vmfsSparse"
    else:
        for t in range(0, TABLES, 97):
            grains[t * 4096 + 100] = b.SE_ZERO
            grains[t * 4096 + 101] = b.SE_UNMAPPED
        cap = TABLES * 4096 * 8
        b.sesparse_layout(cap, grains).write(d / "snap-sesparse.vmdk")
        line, create_type = f'RW {cap} SESPARSE "snap-sesparse.vmdk"', "seSparse"
    return b.write(d / "snap.vmdk", b.descriptor(create_type, [line]))


def _data_segments(path: Path) -> list[tuple[int, int]]:
    """The data (non-hole) ranges of ``path``."""
    out: list[tuple[int, int]] = []
    with path.open("rb") as f:
        fd, pos, size = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def _same_sparse(a: Path, b_: Path) -> None:
    """``a`` and ``b_`` hold the same bytes: compared wherever either has data (holes
    in both read as zeros), without reading gigabytes of holes."""
    assert a.stat().st_size == b_.stat().st_size
    with a.open("rb") as fa, b_.open("rb") as fb:
        for start, end in _data_segments(a) + _data_segments(b_):
            for at in range(start, end, 1 << 24):
                n = min(1 << 24, end - at)
                assert os.pread(fa.fileno(), n, at) == os.pread(fb.fileno(), n, at), at


def _side_by_side(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    done = []
    for c, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cowd", "sesparse"])
def test_extents_past_the_old_cap_read_as_qemu_img(tmp_path: Path, kind: str) -> None:
    top = str(_large(tmp_path, kind))
    ours, ref = tmp_path / "ours.raw", tmp_path / "ref.raw"
    qcowlib = [sys.executable, "-m", "qcowlib"]
    q_conv, q_map, o_conv, o_map = _side_by_side(
        ["qemu-img", "convert", "-O", "raw", top, str(ref)],
        ["qemu-img", "map", "--output", "json", top],
        [*qcowlib, "convert", "-O", "raw", top, str(ours)],
        [*qcowlib, "map", "--output", "json", top],
    )
    for done in (q_conv, q_map, o_conv, o_map):
        assert done.returncode == 0, done.stderr
    assert json.loads(o_map.stdout) == json.loads(q_map.stdout)
    assert len(json.loads(q_map.stdout)) > 2 * TABLES  # a data run in every table
    _same_sparse(ours, ref)


def _one_table_many_times(d: Path, n: int) -> tuple[Path, int]:
    """``n`` directory entries naming one table, whose grain 5 is data, in a sparse
    200 MiB file; the capacity (2 TiB) reaches past the directory."""
    blob = bytearray(b.cowd(8192, {0: bytes(512)}))
    struct.pack_into("<II", blob, 0x0C, 0xFFFFFFFF, 1)  # disk sectors, granularity 1
    struct.pack_into("<II", blob, 0x14, 64, n)  # directory at sector 64, n entries
    blob = blob[: 64 * 512].ljust(64 * 512, b"\0") + struct.pack(f"<{n}I", *[128] * n)
    blob = blob.ljust(128 * 512, b"\0") + struct.pack("<6I", 0, 0, 0, 0, 0, 200)
    blob = blob.ljust(200 * 512, b"\0") + b"\x5a" * 512
    path = b.write(d / "c-delta.vmdk", bytes(blob))
    with path.open("r+b") as f:
        f.truncate(200 << 20)
    top = b.write(d / "c.vmdk", b.descriptor("vmfsSparse", ['RW 8 SPARSE "c-delta.vmdk"']))
    return top, n * 4096 * 512


def test_directory_naming_one_table_many_times(tmp_path: Path) -> None:
    """8,192 entries naming one table: 2^25 grains, mapped a window at a time in bounded
    memory (qcowlib once refused it, or would have held the whole map); info, map and
    reads as qemu-img, and an I/O error where the directory ends."""
    top, mapped = _one_table_many_times(tmp_path, 8192)
    q, o = qemu_img("info", "--output", "json", top), cli("info", "--output", "json", top)
    assert o.returncode == 0 and json.loads(o.stdout) == json.loads(q.stdout)
    for start, length in ((0, 300 << 20), (mapped - (1 << 20), 1 << 20), (mapped, 1 << 20)):
        args = ["map", "--output", "json", "--start-offset", str(start)]
        args += ["--max-length", str(length), str(top)]
        q, o = qemu_img(*args, check=False), cli(*args)
        assert o.returncode == q.returncode, (start, o.stderr, q.stderr)
        if q.returncode == 0:
            assert json.loads(o.stdout) == json.loads(q.stdout), start
    tracemalloc.start()
    try:
        with open_vmdk(HostFile(str(top)), str(top)) as d:
            data = [e for e in d.extents(0, mapped) if e.kind is ExtentKind.DATA]
            assert d.read(5 * 512, 512) == d.read(mapped - 4091 * 512, 512) == b"\x5a" * 512
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) == 8192 and {e.host_offset for e in data} == {200 * 512}
    assert peak < 48 << 20, peak
