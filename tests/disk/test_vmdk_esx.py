"""The VMDK variants ESXi writes (vmfs, vmfsSparse/COWD, seSparse, their deltas), read
as qemu-img 7.2 reads them.

qemu-img cannot create these, so the images are built here (hand-written descriptors,
COWD and seSparse extents from :mod:`tests.formats.esx_builders`); the oracle is
qemu-img reading the same files: ``convert -O raw`` byte-identical, ``info`` and
``map`` JSON equal, ``check`` exit codes (and ERROR lines) equal, refusals with
qemu-img's message.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qcowlib.core.chain import SAFE
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import (
    BackingMismatch,
    CorruptImage,
    QcowlibError,
    TruncatedImage,
    UnsafeBackingPath,
    UnsupportedFeature,
)
from qcowlib.formats.opener import open_disk
from qcowlib.formats.vmdk.cowd import parse_cowd_header
from qcowlib.formats.vmdk.reader import open_vmdk
from tests.conftest import cli, qemu_img
from tests.formats import esx_builders as b

pytestmark = pytest.mark.usefixtures("qemu")


def _rng_bytes(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def _vmfs(d: Path, rb: Callable[[int], bytes]) -> Path:
    flat = bytearray(rb(1 << 20))
    flat[4096:65536] = bytes(61440)  # a zero area inside the data
    b.write(d / "base-flat.vmdk", bytes(flat))
    return b.write(d / "base.vmdk", b.descriptor("vmfs", ['RW 2048 VMFS "base-flat.vmdk"']))


def _vmfs_sparse_delta(d: Path, rb: Callable[[int], bytes]) -> Path:
    _vmfs(d, rb)
    grains = {0: rb(512), 1: rb(512), 7: rb(300), 1000: rb(512), 2047: rb(512)}
    b.write(d / "snap-delta.vmdk", b.cowd(2048, grains))
    return b.write(
        d / "snap.vmdk",
        b.descriptor(
            "vmfsSparse",
            ['RW 2048 VMFSSPARSE "snap-delta.vmdk"'],
            cid=0x55,
            parent_cid=0x1234ABCD,
            parent="base.vmdk",
        ),
    )


def _cowd_multi_table(d: Path, rb: Callable[[int], bytes]) -> Path:
    # 8-sector grains, three grain tables (32768 sectors each), grains out of order
    grains = {5000: rb(4096), 0: rb(4096), 4095: rb(4096), 4096: rb(100), 9000: rb(4096)}
    b.write(d / "big-delta.vmdk", b.cowd(9001 * 8, grains, granularity=8))
    return b.write(d / "big.vmdk", b.descriptor("vmfsSparse", ['RW 72008 SPARSE "big-delta.vmdk"']))


def _sesparse(d: Path, rb: Callable[[int], bytes]) -> Path:
    grains: dict[int, bytes | int] = {
        0: rb(4096),
        1: b.SE_ZERO,
        3: b.SE_UNMAPPED,
        4: rb(4000),
        5: rb(4096),
        4097: rb(4096),
        8191: rb(4096),
    }
    capacity = 2 * 32768 + 16  # a third, partly used grain table's range
    b.write(d / "s-sesparse.vmdk", b.sesparse(capacity, grains, first_cluster=4094))
    return b.write(
        d / "s.vmdk", b.descriptor("seSparse", [f'RW {capacity} SESPARSE "s-sesparse.vmdk"'])
    )


def _sesparse_delta(d: Path, rb: Callable[[int], bytes]) -> Path:
    _vmfs(d, rb)
    grains: dict[int, bytes | int] = {2: rb(4096), 3: b.SE_ZERO, 200: rb(4096)}
    b.write(d / "t-sesparse.vmdk", b.sesparse(2048, grains))
    return b.write(
        d / "t.vmdk",
        b.descriptor(
            "seSparse",
            ['RW 2048 SESPARSE "t-sesparse.vmdk"'],
            parent_cid=0x1234ABCD,
            parent="base.vmdk",
        ),
    )


def _skipped_lines(d: Path, rb: Callable[[int], bytes]) -> Path:
    b.write(d / "f.bin", rb(1 << 20))
    lines = [
        'RDONLY 2048 VMFS "f.bin"',
        'RW 1024 FLAT "f.bin" 16',
        'NOACCESS 100 FLAT "f.bin" 0',
        "RW 100 ZERO",
        'RW 100 VMFSRDM "f.bin"',
        'RW 0 VMFS "f.bin"',
        'rw 100 VMFS "f.bin"',
        'RW 1000 VMFS "f.bin"',
    ]
    return b.write(d / "skip.vmdk", b.descriptor("vmfs", lines))


def _mixed(d: Path, rb: Callable[[int], bytes]) -> Path:
    b.write(d / "m-delta.vmdk", b.cowd(2048, {3: rb(4096)}, granularity=8))
    b.write(d / "m-flat.vmdk", rb(1 << 20))
    b.write(d / "m-sesparse.vmdk", b.sesparse(2048, {9: rb(4096)}))
    lines = [
        'RW 2048 VMFSSPARSE "m-delta.vmdk"',
        'RW 2048 VMFS "m-flat.vmdk"',
        'RW 2048 SESPARSE "m-sesparse.vmdk"',
        'RW 2048 SPARSE "m-delta.vmdk"',
    ]
    return b.write(d / "m.vmdk", b.descriptor("vmfsSparse", lines))


def _cowd_top(d: Path, rb: Callable[[int], bytes]) -> Path:
    text = b"CID=abcdef01\nparentCID=ffffffff\n"
    return b.write(d / "top.vmdk", b.cowd(2048, {0: rb(512), 33: rb(512)}, text=text))


def _delta_of_delta(d: Path, rb: Callable[[int], bytes]) -> Path:
    _vmfs_sparse_delta(d, rb)  # CID 0x55 over base.vmdk
    grains: dict[int, bytes | int] = {1: rb(4096), 2: b.SE_ZERO, 100: rb(4096)}
    b.write(d / "snap2-sesparse.vmdk", b.sesparse(2048, grains))
    return b.write(
        d / "snap2.vmdk",
        b.descriptor(
            "seSparse",
            ['RW 2048 SESPARSE "snap2-sesparse.vmdk"'],
            cid=0x66,
            parent_cid=0x55,
            parent="snap.vmdk",
        ),
    )


def _cowd_top_delta(d: Path, rb: Callable[[int], bytes]) -> Path:
    _vmfs(d, rb)
    text = b'CID=abcdef01\nparentCID=1234abcd\nparentFileNameHint="base.vmdk"\n'
    return b.write(d / "top.vmdk", b.cowd(2048, {5: rb(512), 2000: rb(512)}, text=text))


IMAGES = {
    "delta-of-delta": _delta_of_delta,
    "cowd-top-delta": _cowd_top_delta,
    "vmfs": _vmfs,
    "vmfsSparse-delta": _vmfs_sparse_delta,
    "cowd-tables": _cowd_multi_table,
    "seSparse": _sesparse,
    "seSparse-delta": _sesparse_delta,
    "skipped-lines": _skipped_lines,
    "mixed-extents": _mixed,
    "cowd-top": _cowd_top,
}


def _both(*args: str | Path) -> tuple[object, object]:
    q = qemu_img(*args, check=False)
    o = cli(*args)
    assert (q.returncode, o.returncode) == (0, 0), (q.stderr, o.stderr)
    return json.loads(q.stdout), json.loads(o.stdout)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_reads_as_qemu_img(tmp_path: Path, name: str) -> None:
    top = IMAGES[name](tmp_path, _rng_bytes(len(name)))
    ref, out = tmp_path / "ref.raw", tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", top, ref)
    assert cli("convert", "-O", "raw", top, out).returncode == 0
    assert out.read_bytes() == ref.read_bytes()
    for cmd in ("info", "map"):
        q, o = _both(cmd, "--output", "json", top)
        assert o == q, cmd
    q, o = _both("info", "--backing-chain", "--output", "json", top)
    assert o == q
    assert cli("check", top).returncode == qemu_img("check", top, check=False).returncode


def _desc(d: Path, text: bytes, name: str = "d.vmdk") -> Path:
    b.write(d / "f.bin", bytes(1 << 16))
    return b.write(d / name, text)


REFUSED_TYPES = [
    "vmfsThin",
    "vmfsRDM",
    "vmfsRDMP",
    "vmfsPassthroughRawDeviceMap",
    "vmfsRaw",
    "vmfsEagerZeroedThick",
    "custom",
    "fullDevice",
    "partitionedDevice",
    "monolithicSparse",
    "streamOptimized",
]


def _qemu_reason(path: Path) -> str:
    q = qemu_img("info", path, check=False)
    assert q.returncode == 1
    return q.stderr.strip().rsplit("': ", 1)[-1]


@pytest.mark.parametrize("create_type", REFUSED_TYPES)
def test_refused_create_types_as_qemu(tmp_path: Path, create_type: str) -> None:
    path = _desc(tmp_path, b.descriptor(create_type, ['RW 128 VMFS "f.bin"']))
    reason = _qemu_reason(path)
    assert reason == f"Unsupported image type '{create_type}'"
    out = cli("info", path)
    assert out.returncode == 1 and reason in out.stderr


@pytest.mark.parametrize(
    "line",
    ['RW 100 VMFS "f.bin" 5', 'RW 100 FLAT "f.bin"', 'RW 100 FLAT "f.bin" -1', 'RW 9 X "f" 1'],
)
def test_invalid_extent_lines_as_qemu(tmp_path: Path, line: str) -> None:
    path = _desc(tmp_path, b.descriptor("vmfs", ['RW 128 VMFS "f.bin"', line]))
    reason = _qemu_reason(path)
    assert reason == f"Invalid extent line: {line}"
    out = cli("info", path)
    assert out.returncode == 1 and reason in out.stderr


def _sesparse_desc(d: Path, extent: bytes) -> Path:
    b.write(d / "x-sesparse.vmdk", extent)
    return b.write(d / "x.vmdk", b.descriptor("seSparse", ['RW 2048 SESPARSE "x-sesparse.vmdk"']))


def _poke(blob: bytes, at: int, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into("<Q", out, at, value)
    return bytes(out)


_SE = b.sesparse(2048, {0: bytes(range(256)) * 16})


@pytest.mark.parametrize(
    "extent",
    [
        _poke(_SE, 0, 0xCAFEBABF),  # const magic
        _poke(_SE, 8, 0x0000000200000002),  # version
        _poke(_SE, 24, 16),  # grain size
        _poke(_SE, 32, 128),  # grain table size
        _poke(_SE, 40, 1),  # flags
        _poke(_SE, 64, 1),  # reserved3
        _poke(_SE, 300, 1),  # const padding
        _poke(_SE, 512, 0xCAFECAFF),  # volatile magic
        _poke(_SE, 512 + 24, 1),  # replay_journal
        _poke(_SE, 512 + 40, 1),  # volatile padding
    ],
)
def test_sesparse_header_refusals_as_qemu(tmp_path: Path, extent: bytes) -> None:
    path = _sesparse_desc(tmp_path, extent)
    reason = _qemu_reason(path)
    out = cli("info", path)
    assert out.returncode == 1 and reason in out.stderr


def _broken(d: Path, which: str) -> Path:
    rb = _rng_bytes(3)
    if which == "cowd-short-directory":  # grains past the directory: an I/O error to qemu
        b.write(d / "e-delta.vmdk", b.cowd(16384, {0: rb(512), 5000: rb(512)}, l1dir_size=2))
        return b.write(
            d / "e.vmdk", b.descriptor("vmfsSparse", ['RW 16384 VMFSSPARSE "e-delta.vmdk"'])
        )
    grains: dict[int, bytes | int] = {0: rb(4096), 5: 0x4000000000000000, 7: 5}
    gd = {1: 0x2000000000000001} if which == "sesparse-bad-directory" else {}
    b.write(d / "e-sesparse.vmdk", b.sesparse(65536, grains, gd_entries=gd))
    return b.write(d / "e.vmdk", b.descriptor("seSparse", ['RW 65536 SESPARSE "e-sesparse.vmdk"']))


@pytest.mark.parametrize(
    "which", ["cowd-short-directory", "sesparse-bad-entries", "sesparse-bad-directory"]
)
def test_unmappable_grains_as_qemu(tmp_path: Path, which: str) -> None:
    """Entries QEMU cannot map: info works, map and convert fail, check reports the
    first such sector with qemu-img's line and exit code."""
    path = _broken(tmp_path, which)
    q, o = _both("info", "--output", "json", path)
    assert o == q
    cmds: list[list[str | Path]] = [
        ["map", path],
        ["convert", "-O", "raw", path, tmp_path / "o.raw"],
    ]
    for cmd in cmds:
        assert qemu_img(*cmd, check=False).returncode == 1
        out = cli(*cmd)
        assert out.returncode == 1 and "qemu-img reads it as an I/O error" in out.stderr
    qc, oc = qemu_img("check", path, check=False), cli("check", path)
    assert oc.returncode == qc.returncode == 1
    line = next(x for x in qc.stdout.splitlines() + qc.stderr.splitlines() if "ERROR" in x)
    assert line in oc.stdout + oc.stderr


def test_grain_past_eof_check_as_qemu(tmp_path: Path) -> None:
    blob = bytearray(b.cowd(8192, {0: bytes(512), 3: bytes(512)}))
    (gt,) = struct.unpack_from("<I", blob, 4 * 512)
    struct.pack_into("<I", blob, gt * 512 + 4 * 3, 99999)
    b.write(tmp_path / "e-delta.vmdk", bytes(blob))
    path = b.write(
        tmp_path / "e.vmdk", b.descriptor("vmfsSparse", ['RW 8192 SPARSE "e-delta.vmdk"'])
    )
    qc, oc = qemu_img("check", path, check=False), cli("check", path)
    assert oc.returncode == qc.returncode == 1
    assert "ERROR: cluster offset for sector 3 points after EOF" in qc.stderr + qc.stdout
    assert "ERROR: cluster offset for sector 3 points after EOF" in oc.stderr + oc.stdout
    # qemu-img reads zeros past the end of the file; qcowlib refuses to read such a grain
    with pytest.raises(TruncatedImage):
        _read(path)


@pytest.mark.parametrize("window", [1, 4096, 1 << 18])
def test_a_grain_past_eof_refuses_only_reads_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Only a read (or map) that reaches the grain past the end of the file is refused:
    the rest of its window reads, whatever the window's size (review)."""
    from qcowlib.formats.vmdk import grainmap

    init = grainmap.GrainTables.__init__

    def windowed(self: grainmap.GrainTables, *args: Any, **kw: Any) -> None:
        init(self, *args, **{**kw, "window": window})

    monkeypatch.setattr(grainmap.GrainTables, "__init__", windowed)
    blob = bytearray(b.cowd(8192, {0: b"\x11" * 512, 3: bytes(512), 4100: b"\x22" * 512}))
    (gt,) = struct.unpack_from("<I", blob, 4 * 512)
    struct.pack_into("<I", blob, gt * 512 + 4 * 3, 99999)  # grain 3: past the end
    b.write(tmp_path / "e-delta.vmdk", bytes(blob))
    path = b.write(
        tmp_path / "e.vmdk", b.descriptor("vmfsSparse", ['RW 8192 SPARSE "e-delta.vmdk"'])
    )
    with open_vmdk(HostFile(str(path)), str(path)) as d:
        assert d.read(0, 512) == b"\x11" * 512
        assert d.read(4100 * 512, 512) == b"\x22" * 512
        assert d.read(4 * 512, 512) == bytes(512)
        with pytest.raises(TruncatedImage, match="grain 3 lies past the end"):
            d.read(3 * 512, 512)


def _read(path: Path, policy: object = None) -> bytes:
    with open_vmdk(HostFile(str(path)), str(path), policy) as d:  # type: ignore[arg-type]
        return d.read(0, d.virtual_size)


def test_blank_line_before_extent_refused(tmp_path: Path) -> None:
    """QEMU's sscanf skips the newline of a blank line and reads the next extent line
    twice (twice the size); qcowlib refuses such an ambiguous descriptor."""
    text = b'version=1\nCID=1\nparentCID=ffffffff\ncreateType="vmfs"\n\nRW 128 VMFS "f.bin"\n'
    path = _desc(tmp_path, text)
    assert json.loads(qemu_img("info", "--output=json", path).stdout)["virtual-size"] == 2 * 65536
    with pytest.raises(CorruptImage, match="follows a blank line"):
        _read(path)


def test_cowd_top_without_cid_refused_as_qemu(tmp_path: Path) -> None:
    path = b.write(tmp_path / "c.vmdk", b.cowd(2048, {0: bytes(512)}))
    assert _qemu_reason(path) == "Invalid argument"
    with pytest.raises(CorruptImage, match="CID"):
        _read(path)


def test_changed_parent_refused(tmp_path: Path) -> None:
    top = _vmfs_sparse_delta(tmp_path, _rng_bytes(1))
    top.write_bytes(top.read_bytes().replace(b"parentCID=1234abcd", b"parentCID=1234abce"))
    with pytest.raises(BackingMismatch), open_disk(str(top)) as d:
        d.read(0, 512)


def _hostile_cowd(which: str) -> bytes:
    blob = bytearray(b.cowd(8192, {0: bytes(512)}))
    if which == "directory-past-end":
        struct.pack_into("<I", blob, 0x14, 1 << 30)
    elif which == "huge-directory":
        struct.pack_into("<I", blob, 0x18, 0xFFFFFFFF)
    elif which == "long-directory":
        struct.pack_into("<I", blob, 0x18, 1 << 20)
    elif which == "granularity-0":
        struct.pack_into("<I", blob, 0x10, 0)
    elif which == "granularity-huge":
        struct.pack_into("<I", blob, 0x10, 0x200001)
    elif which == "table-past-end":
        struct.pack_into("<I", blob, 4 * 512, 1 << 28)
    elif which == "many-tables":
        struct.pack_into("<II", blob, 0x0C, 0xFFFFFFFF, 1)
        blob = blob[:4096] + struct.pack("<8I", *[8] * 8)
        struct.pack_into("<II", blob, 0x14, 8, 8)
    return bytes(blob)


@pytest.mark.parametrize(
    "which",
    [
        "directory-past-end",
        "huge-directory",
        "long-directory",
        "granularity-0",
        "granularity-huge",
        "table-past-end",
        "many-tables",
    ],
)
def test_hostile_cowd_refused(tmp_path: Path, which: str) -> None:
    b.write(tmp_path / "h-delta.vmdk", _hostile_cowd(which))
    path = b.write(tmp_path / "h.vmdk", b.descriptor("vmfsSparse", ['RW 8 SPARSE "h-delta.vmdk"']))
    with pytest.raises(QcowlibError) as caught:
        _read(path)
    assert "h-delta.vmdk" in str(caught.value)
    assert cli("info", path).returncode == 1


@pytest.mark.parametrize(
    ("at", "value"),
    [
        (16 * 8, 1 << 40),  # grain directory offset
        (17 * 8, 1 << 40),  # grain directory size
        (10 * 8, 1 << 40),  # volatile header offset
        (2 * 8, 1 << 62),  # capacity
        (24 * 8, 1 << 60),  # grains offset
        (18 * 8, 1 << 60),  # grain tables offset
    ],
)
def test_hostile_sesparse_refused(tmp_path: Path, at: int, value: int) -> None:
    path = _sesparse_desc(tmp_path, _poke(_SE, at, value))
    with pytest.raises(QcowlibError):
        _read(path)
    assert cli("info", path).returncode == 1


def test_sesparse_table_past_end_refused(tmp_path: Path) -> None:
    blob = b.sesparse(2048, {0: bytes(4096)}, gd_entries={0: 0x1000000000000000 | 999})
    with pytest.raises(TruncatedImage):
        _read(_sesparse_desc(tmp_path, blob))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_extent_files_refused(tmp_path: Path, kind: str) -> None:
    name = "/dev/null" if kind == "device" else str(tmp_path / "fifo")
    if kind == "fifo":
        os.mkfifo(name)
    for line in (f'RW 8 VMFS "{name}"', f'RW 8 VMFSSPARSE "{name}"', f'RW 8 SESPARSE "{name}"'):
        path = b.write(tmp_path / "s.vmdk", b.descriptor("vmfs", [line]))
        with pytest.raises(QcowlibError):
            _read(path)


@pytest.mark.parametrize("etype", ["VMFS", "VMFSSPARSE", "SESPARSE"])
def test_escaping_extents_refused_when_contained(tmp_path: Path, etype: str) -> None:
    (tmp_path / "sub").mkdir()
    b.write(tmp_path / "out.bin", bytes(4096))
    path = b.write(
        tmp_path / "sub" / "d.vmdk", b.descriptor("vmfs", [f'RW 8 {etype} "../out.bin"'])
    )
    with pytest.raises(UnsafeBackingPath):
        _read(path, SAFE)


def test_escaping_parent_refused_when_contained(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    _vmfs(tmp_path, _rng_bytes(1))
    b.write(sub / "c-delta.vmdk", b.cowd(2048, {0: bytes(512)}))
    top = b.write(
        sub / "c.vmdk",
        b.descriptor(
            "vmfsSparse",
            ['RW 2048 VMFSSPARSE "c-delta.vmdk"'],
            parent_cid=0x1234ABCD,
            parent="../base.vmdk",
        ),
    )
    with pytest.raises(UnsafeBackingPath), open_disk(str(top), None, SAFE) as d:
        d.read(0, 512)
    out = cli("convert", "--backing-policy", "contained", "-O", "raw", top, tmp_path / "o")
    assert out.returncode == 1


@pytest.mark.parametrize("name", ["vmfs", "vmfsSparse-delta", "seSparse"])
def test_validate_reports_the_extents(tmp_path: Path, name: str) -> None:
    top = IMAGES[name](tmp_path, _rng_bytes(2))
    out = cli("validate", "--output", "json", top)
    report = json.loads(out.stdout)
    assert out.returncode == 1 and not report["ok"]
    extent_findings = [f for f in report["findings"] if f["rule"] == "vmdk-extent"]
    assert extent_findings, report
    wanted = {"vmfs": "base-flat.vmdk", "vmfsSparse-delta": "snap-delta.vmdk"}
    assert wanted.get(name, "s-sesparse.vmdk") in extent_findings[0]["message"]


def test_refused_sesparse_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFeature, match="Replaying journal"):
        _read(_sesparse_desc(tmp_path, _poke(_SE, 512 + 24, 1)))


@pytest.mark.parametrize("which", ["granularity-0", "directory-past-end"])
def test_validate_checks_a_cowd_header_on_its_own(tmp_path: Path, which: str) -> None:
    """A COWD file given alone is checked by the VMDK package's COWD codec."""
    path = b.write(tmp_path / "alone.vmdk", _hostile_cowd(which))
    out = cli("validate", "--output", "json", path)
    report = json.loads(out.stdout)
    assert out.returncode == 1 and not report["ok"] and report["format"] == "vmdk"
    structure = [f["message"] for f in report["findings"] if f["rule"] == "structure"]
    with pytest.raises(QcowlibError) as caught:
        parse_cowd_header(path.read_bytes()[:512], path.stat().st_size)
    assert any(caught.value.message in m for m in structure), report
