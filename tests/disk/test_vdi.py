"""VDI images: reads and maps against qemu-img, the writer through qemu-img, hostile files."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest

from qcowlib.core.disk import Disk, ExtentKind
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, FormatError, TruncatedImage, UnsupportedFeature
from qcowlib.formats.opener import open_disk
from qcowlib.formats.raw.reader import RawDisk
from qcowlib.formats.vdi import codec as vdi
from qcowlib.formats.vdi.output import write_vdi
from qcowlib.formats.vdi.reader import VdiDisk
from tests.conftest import qemu_img, qemu_json

MiB = 1024 * 1024
#: Scattered writes: inside one block, across block boundaries, the last sector.
WRITES = [
    ("0x5a", 0, 4096),
    ("0x11", 3 * MiB - 512, 1024),
    ("0x7f", 5 * MiB + 12345 // 512 * 512, 300 * 1024),
    ("0x01", 9 * MiB, 2 * MiB),
]


def qemu_io(fmt: str, path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def make_vdi(path: Path, size: int = 12 * MiB, *, static: bool = False) -> Path:
    opts = ["-o", "static=on"] if static else []
    qemu_img("create", "-q", "-f", "vdi", *opts, path, str(size))
    qemu_io("vdi", path, *(f"write -P {p} {o} {n}" for p, o, n in WRITES))
    qemu_io("vdi", path, f"write -P 0x42 {size - 512} 512")
    return path


def seeded_raw(path: Path, size: int, seed: int = 7) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(12):
            off = rng.randrange(0, size - 70000)
            f.seek(off)
            f.write(rng.randbytes(rng.randrange(1, 70000)))
    return path


def open_vdi(path: Path) -> VdiDisk:
    return VdiDisk(HostFile(str(path)), str(path))


def qemu_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".raw")
    qemu_img("convert", "-f", "vdi", "-O", "raw", path, out)
    return out.read_bytes()


def our_map(d: Disk) -> list[tuple[int, int, bool, bool, int | None]]:
    return [
        (
            e.start,
            e.length,
            e.kind is ExtentKind.DATA,
            e.reads_zero,
            e.host_offset if e.kind is ExtentKind.DATA else None,
        )
        for e in d.extents()
    ]


def their_map(path: Path) -> list[tuple[int, int, bool, bool, int | None]]:
    return [
        (m["start"], m["length"], m["data"], m["zero"], m.get("offset"))
        for m in qemu_json("map", "-f", "vdi", path)
    ]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_read_and_map_match_qemu(qemu: None, tmp_path: Path, static: bool) -> None:
    img = make_vdi(tmp_path / "a.vdi", static=static)
    with open_vdi(img) as d:
        assert d.format == "vdi"
        assert d.virtual_size == 12 * MiB
        assert d.read(0, d.virtual_size) == qemu_raw(img, tmp_path)
        assert our_map(d) == their_map(img)
        # unaligned reads across runs
        want = qemu_raw(img, tmp_path)
        for off, n in [(1, 3 * MiB), (3 * MiB - 700, 2000), (12 * MiB - 513, 513)]:
            assert d.read(off, n) == want[off : off + n]


def test_converted_from_seeded_raw(qemu: None, tmp_path: Path) -> None:
    raw = seeded_raw(tmp_path / "src.raw", 9 * MiB + 4096)
    img = tmp_path / "c.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", raw, img)
    with open_vdi(img) as d:
        assert d.read(0, d.virtual_size) == raw.read_bytes()
        assert d.read(0, d.virtual_size) == qemu_raw(img, tmp_path)
        assert our_map(d) == their_map(img)


def test_discarded_block_reads_zero(qemu: None, tmp_path: Path) -> None:
    img = make_vdi(tmp_path / "d.vdi")
    with open(img, "r+b") as f:  # mark block 0 (written with 0x5a) discarded
        f.seek(0x200)
        f.write(struct.pack("<I", vdi.VDI_DISCARDED))
    with open_vdi(img) as d:
        assert d.read(0, MiB) == bytes(MiB)
        first = next(d.extents())
        assert first.kind is ExtentKind.ZERO
        assert d.read(0, d.virtual_size) == qemu_raw(img, tmp_path)


def test_chain_cannot_open_vdi_yet_or_can(qemu: None, tmp_path: Path) -> None:
    """Once chain.py knows "vdi", open_disk probes it; until then it says unsupported."""
    img = make_vdi(tmp_path / "p.vdi")
    try:
        d = open_disk(str(img))
    except UnsupportedFeature:
        return
    with d:
        assert d.format == "vdi"


# -- the writer ---------------------------------------------------------------------------


def _write(src: Disk, out: Path, *, static: bool) -> int:
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return write_vdi(src, fd, static=static)
    finally:
        os.close(fd)


def _check_output(out: Path, src: Path, src_fmt: str, *, static: bool, size: int) -> None:
    res = qemu_img("check", "-f", "vdi", out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    res = qemu_img("compare", "-f", "vdi", "-F", src_fmt, out, src, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    info = qemu_json("info", "-f", "vdi", out)
    assert info["format"] == "vdi"
    assert info["virtual-size"] == size
    head = vdi.parse_header(out.read_bytes()[:512])
    assert head.is_static is static
    if static:
        assert head.blocks_allocated == head.blocks_in_image
        assert all(m["data"] for m in qemu_json("map", "-f", "vdi", out))
        assert out.stat().st_size == head.offset_data + head.blocks_in_image * MiB


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_write_from_raw(qemu: None, tmp_path: Path, static: bool) -> None:
    size = 9 * MiB + 4096
    raw = seeded_raw(tmp_path / "src.raw", size)
    out = tmp_path / "out.vdi"
    with RawDisk(HostFile(str(raw)), str(raw)) as src:
        end = _write(src, out, static=static)
    assert end == out.stat().st_size
    _check_output(out, raw, "raw", static=static, size=size)
    with open_vdi(out) as d:
        assert d.read(0, size) == raw.read_bytes()
        if not static:
            # all-zero blocks stay unallocated
            blocks = {(o // MiB) for o in range(0, size, 4096) if any(d.read(o, 4096))}
            assert d.blocks_allocated == len(blocks)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_write_from_qcow2(qemu: None, tmp_path: Path, static: bool) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "20M")
    qemu_io("qcow2", src, "write -P 0x33 1M 64k", "write -P 0x44 7M 3M", "write -z 8M 512k")
    out = tmp_path / "out.vdi"
    with open_disk(str(src)) as disk:
        _write(disk, out, static=static)
    _check_output(out, src, "qcow2", static=static, size=20 * MiB)
    if not static:
        assert vdi.parse_header(out.read_bytes()[:512]).blocks_allocated == 4


def test_write_empty_and_tiny(qemu: None, tmp_path: Path) -> None:
    for size in (0, 512, MiB + 512):
        raw = tmp_path / f"e{size}.raw"
        raw.write_bytes(bytes(size))
        out = tmp_path / f"e{size}.vdi"
        with RawDisk(HostFile(str(raw)), str(raw)) as src:
            _write(src, out, static=False)
        _check_output(out, raw, "raw", static=False, size=size)
        with open_vdi(out) as d:
            assert d.blocks_allocated == 0


def test_fresh_uuids(qemu: None, tmp_path: Path) -> None:
    raw = seeded_raw(tmp_path / "s.raw", 2 * MiB)
    heads = []
    for name in ("a.vdi", "b.vdi"):
        with RawDisk(HostFile(str(raw)), str(raw)) as src:
            _write(src, tmp_path / name, static=False)
        heads.append(vdi.parse_header((tmp_path / name).read_bytes()[:512]))
    assert heads[0].uuid_image != heads[1].uuid_image
    assert heads[0].uuid_image.int != 0


# -- hostile files --------------------------------------------------------------------------


def _poke(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize(
    ("pokes", "error"),
    [
        ([(0x40, 0x12345678)], FormatError),  # bad signature
        ([(0x4C, vdi.VDI_TYPE_DIFF)], UnsupportedFeature),  # differencing image
        ([(0x154, 0x10000000), (0x158, 0x20000000)], TruncatedImage),  # block map past EOF
        ([(0x180, 0x3F000000)], CorruptImage),  # huge block count (map overlaps data)
        ([(0x158, 0xFFFFFE00), (0x180, 0x3F000000)], TruncatedImage),  # huge map, small file
        ([(0x200, 11)], TruncatedImage),  # block index beyond the file
        ([(0x200, 5000)], CorruptImage),  # block index beyond the image
    ],
)
def test_hostile(
    qemu: None, tmp_path: Path, pokes: list[tuple[int, int]], error: type[Exception]
) -> None:
    img = make_vdi(tmp_path / "h.vdi")
    for offset, value in pokes:
        _poke(img, offset, "<I", value)
    t = time.monotonic()
    with pytest.raises(error) as info:
        open_vdi(img)
    assert time.monotonic() - t < 0.5
    assert info.value.file == str(img)  # type: ignore[attr-defined]


def test_truncated_file(qemu: None, tmp_path: Path) -> None:
    img = make_vdi(tmp_path / "t.vdi")
    os.truncate(img, 300)
    with pytest.raises(TruncatedImage):
        open_vdi(img)
    img = make_vdi(tmp_path / "t2.vdi")
    os.truncate(img, 0x400 + MiB)  # header, map and the first data block only
    with pytest.raises(TruncatedImage):
        open_vdi(img)


def test_qemu_info_of_our_static_output(qemu: None, tmp_path: Path) -> None:
    raw = seeded_raw(tmp_path / "s.raw", 3 * MiB)
    out = tmp_path / "s.vdi"
    with RawDisk(HostFile(str(raw)), str(raw)) as src:
        _write(src, out, static=True)
    info = json.loads(qemu_img("info", "--output=json", out).stdout)
    assert info["format"] == "vdi"
    assert info["cluster-size"] == MiB
