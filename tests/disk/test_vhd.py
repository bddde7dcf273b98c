"""VHD ("vpc") reader and writer against qemu-img: reads byte-identical to
``qemu-img convert -O raw``, written images equal in ``qemu-img compare``, hostile
images refused with clear errors."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qcowlib.core.disk import ExtentKind
from qcowlib.core.hostfile import HostFile
from qcowlib.core.sinks import atomic_output
from qcowlib.errors import (
    CorruptImage,
    FormatError,
    QcowlibError,
    TruncatedImage,
    UnsupportedFeature,
)
from qcowlib.formats.opener import open_disk
from qcowlib.formats.vhd import codec as vhd
from qcowlib.formats.vhd.output import write_vhd
from qcowlib.formats.vhd.reader import VhdDisk
from tests.conftest import qemu_img, qemu_io, qemu_json, seeded_raw

pytestmark = pytest.mark.usefixtures("qemu")

WRITES = [(0, 0xAB, "64k"), (5 << 20, 0x11, "1M"), (20 << 20, 0x22, "3000k"), (29 << 20, 7, "512")]


def make_vpc(path: Path, subformat: str, size: str = "30M") -> Path:
    qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", path, size)
    qemu_io(path, "vpc", *(f"write -P {p} {off} {n}" for off, p, n in WRITES))
    return path


def reference(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".ref.raw")
    qemu_img("convert", "-f", "vpc", "-O", "raw", path, out)
    return out.read_bytes()


def ours(path: Path) -> bytes:
    with VhdDisk(HostFile(str(path)), str(path)) as d:
        return d.read(0, d.virtual_size)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_io_images_read_identical(tmp_path: Path, subformat: str) -> None:
    p = make_vpc(tmp_path / f"{subformat}.vhd", subformat)
    with VhdDisk(HostFile(str(p)), str(p)) as d:
        assert d.format == "vpc" and d.subformat == subformat
        assert d.virtual_size == qemu_json("info", "-f", "vpc", p)["virtual-size"]
        exts = list(d.extents())
        assert exts[0].start == 0 and exts[-1].end == d.virtual_size
        if subformat == "dynamic":
            kinds = {e.kind for e in exts}
            assert kinds == {ExtentKind.DATA, ExtentKind.ZERO}  # qemu-img map: zero, present
    assert ours(p) == reference(p, tmp_path)


# Sizes: CHS-exact and not, below and above one 2 MiB block, not block-aligned.
SIZES = [512, 1 << 20, 10000384, 10027008, 33 << 20, 64 * 1024 * 1024 + 4096 * 3]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_convert_images_read_identical(tmp_path: Path, size: int, subformat: str) -> None:
    raw = seeded_raw(tmp_path / "src.raw", size, size)
    p = tmp_path / "conv.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={subformat}", raw, p)
    data = ours(p)
    assert data == reference(p, tmp_path)
    assert len(data) == qemu_json("info", "-f", "vpc", p)["virtual-size"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("src_fmt", ["raw", "qcow2"])
def test_writer_round_trips_in_qemu(
    tmp_path: Path, size: int, subformat: str, src_fmt: str
) -> None:
    raw = seeded_raw(tmp_path / "src.raw", size, size + 1)
    src = raw
    if src_fmt == "qcow2":
        src = tmp_path / "src.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, src)
    out = tmp_path / "out.vhd"
    with open_disk(str(src)) as disk, atomic_output(str(out)) as fd:
        end = write_vhd(disk, fd, subformat=subformat)
    assert out.stat().st_size == end
    info = qemu_json("info", "-f", "vpc", out)
    assert info["format"] == "vpc"
    assert info["virtual-size"] == size
    res = qemu_img("compare", "-f", "raw", "-F", "vpc", raw, out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ours(out) == raw.read_bytes()
    if subformat == "dynamic":
        # Zero blocks stay unallocated: the file is no larger than the data needs.
        assert end < size or size < (4 << 20)


def test_writer_footer_choice(tmp_path: Path) -> None:
    for size, creator in [(10027008, b"qemu"), (10000384, b"qem2")]:
        raw = tmp_path / "z.raw"
        raw.write_bytes(b"")
        os.truncate(raw, size)
        out = tmp_path / "z.vhd"
        with open_disk(str(raw)) as disk, atomic_output(str(out)) as fd:
            write_vhd(disk, fd)
        footer = vhd.parse_footer(out.read_bytes()[-512:])
        assert footer.creator_app == creator
        assert out.read_bytes()[:512] == out.read_bytes()[-512:]
        assert qemu_json("info", "-f", "vpc", out)["virtual-size"] == size
        # An all-zero source allocates no block.
        bat_bytes = -(-(-(-size // (1 << 21)) * 4) // 512) * 512
        assert out.stat().st_size == 512 + 1024 + bat_bytes + 512
        with VhdDisk(HostFile(str(out)), str(out)) as d:
            assert all(e.kind is ExtentKind.ZERO and e.host_offset is None for e in d.extents())


def test_bitmap_clear_sectors_read_zero(tmp_path: Path) -> None:
    p = make_vpc(tmp_path / "bm.vhd", "dynamic")
    with VhdDisk(HostFile(str(p)), str(p)) as d:
        assert d.dynamic is not None
        bitmap_at = int(d.bat[0]) * 512
    with p.open("r+b") as f:
        f.seek(bitmap_at)
        f.write(b"\x0f")  # sectors 0-3 unused, 4-7 in use
    with VhdDisk(HostFile(str(p)), str(p)) as d:
        first = list(d.layer_extents(0, 8192))
        assert [(e.start, e.length, e.kind) for e in first] == [
            (0, 2048, ExtentKind.ZERO),
            (2048, 6144, ExtentKind.DATA),
        ]
        data = d.read(0, 8192)
    assert data == bytes(2048) + b"\xab" * 6144


# -- hostile images ------------------------------------------------------------------


def poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def fix_checksum(path: Path, at: int, size: int, skip: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        raw = f.read(size)
        f.seek(at + skip)
        f.write(vhd.checksum(raw, skip).to_bytes(4, "big"))


def dyn_header_poke(path: Path, field_at: int, data: bytes) -> None:
    poke(path, 512 + field_at, data)
    fix_checksum(path, 512, 1024, 36)


def footer_poke(path: Path, field_at: int, data: bytes) -> None:
    size = path.stat().st_size
    for at in (0, size - 512):
        poke(path, at + field_at, data)
        fix_checksum(path, at, 512, 64)


def bad_cookies(p: Path) -> None:
    poke(p, 0, b"XXXXXXXX")
    poke(p, p.stat().st_size - 512, b"X")


def too_large(p: Path) -> None:
    footer_poke(p, 28, b"qem2")
    footer_poke(p, 48, (1 << 42).to_bytes(8, "big"))


HOSTILE = [
    (
        "bad-cookie",
        bad_cookies,
        FormatError,
    ),
    ("bad-checksum", lambda p: poke(p, 48, b"\x01"), CorruptImage),
    (
        "bat-past-eof",
        lambda p: dyn_header_poke(p, 16, (1 << 40).to_bytes(8, "big")),
        TruncatedImage,
    ),
    ("huge-table", lambda p: dyn_header_poke(p, 28, (0x7FFFFFFF).to_bytes(4, "big")), CorruptImage),
    ("table-too-small", lambda p: dyn_header_poke(p, 28, (1).to_bytes(4, "big")), CorruptImage),
    ("bad-block-size", lambda p: dyn_header_poke(p, 32, (1000).to_bytes(4, "big")), CorruptImage),
    ("block-past-eof", lambda p: poke(p, 1536, (1 << 30).to_bytes(4, "big")), TruncatedImage),
    (
        "dyn-header-past-eof",
        lambda p: footer_poke(p, 16, (1 << 40).to_bytes(8, "big")),
        TruncatedImage,
    ),
    ("bad-dyn-cookie", lambda p: poke(p, 512, b"XXXXXXXX"), FormatError),
    ("differencing-no-parent", lambda p: footer_poke(p, 60, (4).to_bytes(4, "big")), CorruptImage),
    ("unknown-type", lambda p: footer_poke(p, 60, (9).to_bytes(4, "big")), CorruptImage),
    (
        "too-large",
        too_large,
        UnsupportedFeature,
    ),
    ("truncated", lambda p: os.truncate(p, 100), TruncatedImage),
]


@pytest.mark.parametrize(("name", "damage", "error"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile(
    tmp_path: Path, name: str, damage: Callable[[Path], object], error: type[QcowlibError]
) -> None:
    p = make_vpc(tmp_path / "h.vhd", "dynamic")
    damage(p)
    t0 = time.monotonic()
    with pytest.raises(error) as exc, VhdDisk(HostFile(str(p)), str(p)) as d:
        d.read(0, d.virtual_size)
    assert time.monotonic() - t0 < 2
    assert exc.value.file == str(p)
    assert exc.value.structure is not None
