"""Differencing VHDs (what Hyper-V and Virtual PC write for checkpoints) read over their
parent.

qemu-img cannot write differencing VHDs (and reads them wrongly, without their parent),
so the child is made the way those tools lay one out: a dynamic VHD written by qemu-io,
then turned into a differencing disk by setting its type, the parent's unique id, its
name and a parent locator, as the VHD specification describes.  The expected disk is
computed independently from qemu-img's reads of the parent and of the child as a dynamic
disk, sector by sector from the child's block table and sector bitmaps.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import qcowlib
from tests.conftest import cli, qemu_img, qemu_io, require_qemu
from tests.formats.test_layer_runs_fragmented import assert_runs_like_extents

MiB = 1 << 20
SIZE = 8 * MiB
BLOCK = 2 * MiB  # qemu-img's default VHD block size


def _vhd_checksum(data: bytes | bytearray, at: int) -> int:
    return ~(sum(data[:at]) + sum(data[at + 4 :])) & 0xFFFFFFFF


def _make_child(
    tmp_path: Path,
    parent: Path,
    locators: list[tuple[bytes, bytes]],
    *,
    name: str = "",
    clear: tuple[int, int] | None = None,
) -> tuple[Path, bytes]:
    """A differencing VHD over ``parent`` and the guest bytes it must read as."""
    child = tmp_path / "child.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", child, str(SIZE))
    qemu_io(child, "vpc", "write -P 0xbb 512k 64k", "write -P 0xcc 5M 4k")
    raw = bytearray(child.read_bytes())
    footer = raw[:512]
    dyn_at = struct.unpack_from(">Q", footer, 16)[0]
    bat_at, entries = struct.unpack_from(">QxxxxI", raw, dyn_at + 16)
    bat = struct.unpack_from(f">{entries}I", raw, bat_at)
    if clear is not None:  # clear bitmap bits [first, last) of block 0: read the parent there
        first, last = clear
        bitmap_at = bat[0] * 512
        for sector in range(first, last):
            raw[bitmap_at + sector // 8] &= ~(0x80 >> (sector % 8)) & 0xFF
    parent_footer = parent.read_bytes()[-512:]
    dyn = bytearray(raw[dyn_at : dyn_at + 1024])
    dyn[40:56] = parent_footer[68:84]  # parent unique id
    dyn[64:576] = name.encode("utf-16-be").ljust(512, b"\0")
    tail = bytearray()
    data_at = len(raw) - 512  # locator data goes before the closing footer
    for i, (platform, data) in enumerate(locators):
        at = data_at + len(tail)
        struct.pack_into(">4sIIIQ", dyn, 576 + 24 * i, platform, 512, len(data), 0, at)
        tail += data.ljust(-(-len(data) // 512) * 512, b"\0")
    struct.pack_into(">I", dyn, 36, _vhd_checksum(dyn, 36))
    raw[dyn_at : dyn_at + 1024] = dyn
    struct.pack_into(">I", footer, 60, 4)  # disk type: differencing
    struct.pack_into(">I", footer, 64, _vhd_checksum(footer, 64))
    out = footer + raw[512:-512] + tail + footer
    # What the child reads as: its own sectors where the table and bitmap say so.
    as_dynamic = tmp_path / "as-dynamic.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", child, as_dynamic)
    mine = as_dynamic.read_bytes()
    theirs = _raw(tmp_path, parent)
    expected = bytearray(theirs)
    for block, entry in enumerate(bat):
        if entry == 0xFFFFFFFF:
            continue
        for sector in range(BLOCK // 512):
            if clear is not None and block == 0 and clear[0] <= sector < clear[1]:
                continue
            at = block * BLOCK + sector * 512
            expected[at : at + 512] = mine[at : at + 512]
    child.write_bytes(out)
    return child, bytes(expected)


def _raw(tmp_path: Path, image: Path) -> bytes:
    out = tmp_path / f"{image.stem}.ref.raw"
    qemu_img("convert", "-O", "raw", image, out)
    return out.read_bytes()


def _parent(tmp_path: Path, where: Path | None = None) -> Path:
    parent = (where or tmp_path) / "base.vhd"
    parent.parent.mkdir(exist_ok=True)
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", parent, str(SIZE))
    qemu_io(parent, "vpc", "write -P 0xaa 0 3M", "write -P 0xa5 6M 1M")
    return parent


def _w(text: str) -> bytes:
    return text.encode("utf-16-le")


@pytest.mark.parametrize(
    "locators",
    [
        [(b"W2ru", _w(".\\base.vhd")), (b"W2ku", _w("C:\\VMs\\base.vhd"))],
        [(b"W2ku", _w("C:\\Hyper-V\\Disks\\base.vhd"))],
        [(b"MacX", b"file://localhost/nowhere/base.vhd")],
    ],
    ids=["relative", "absolute-windows", "mac-url"],
)
def test_differencing_vhd_reads_over_its_parent(
    tmp_path: Path, locators: list[tuple[bytes, bytes]]
) -> None:
    require_qemu()
    parent = _parent(tmp_path)
    if locators[0][0] == b"MacX":
        locators = [(b"MacX", f"file://localhost{parent}".encode())]
    child, expected = _make_child(tmp_path, parent, locators)
    out = tmp_path / "out.raw"
    done = cli("convert", "-O", "raw", child, out)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == expected
    # The parent's data shows through where the child has none (block 1 is the parent's).
    assert expected[2 * MiB : 2 * MiB + 4] == b"\xaa" * 4 and expected[512 * 1024] == 0xBB
    info = json.loads(cli("info", "--output=json", child).stdout)
    assert info["backing-filename-format"] == "vpc"
    assert Path(info["full-backing-filename"]).name == "base.vhd"
    flat = tmp_path / "flat.qcow2"
    assert cli("flatten", child, flat).returncode == 0
    assert qemu_img("compare", "-F", "raw", flat, out).returncode == 0


def test_cleared_bitmap_bits_read_the_parent(tmp_path: Path) -> None:
    require_qemu()
    parent = _parent(tmp_path)
    child, expected = _make_child(
        tmp_path, parent, [(b"W2ru", _w(".\\base.vhd"))], clear=(1024, 1100)
    )
    out = tmp_path / "out.raw"
    assert cli("convert", "-O", "raw", child, out).returncode == 0
    assert out.read_bytes() == expected
    assert expected[1024 * 512] == 0xAA and expected[1100 * 512] == 0xBB  # parent, then child
    entries = json.loads(cli("map", "--output=json", child).stdout)
    depths = {e["depth"] for e in entries if e["data"]}
    assert depths == {0, 1}


def test_the_header_name_is_the_last_resort(tmp_path: Path) -> None:
    require_qemu()
    parent = _parent(tmp_path)
    child, expected = _make_child(tmp_path, parent, [], name="D:\\old\\base.vhd")
    out = tmp_path / "out.raw"
    assert cli("convert", "-O", "raw", child, out).returncode == 0
    assert out.read_bytes() == expected


def test_a_parent_with_another_unique_id_is_refused(tmp_path: Path) -> None:
    require_qemu()
    parent = _parent(tmp_path)
    child, _ = _make_child(tmp_path, parent, [(b"W2ru", _w(".\\base.vhd"))])
    other = tmp_path / "other"
    other.mkdir()
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", other / "base.vhd", str(SIZE))
    moved = other / "child.vhd"
    moved.write_bytes(child.read_bytes())
    done = cli("convert", "-O", "raw", moved, tmp_path / "x.raw")
    assert done.returncode == 1
    assert "unique id differs" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.raw").exists()


def test_no_parent_name_at_all_is_a_clear_error(tmp_path: Path) -> None:
    require_qemu()
    parent = _parent(tmp_path)
    child, _ = _make_child(tmp_path, parent, [])
    done = cli("info", child)
    assert done.returncode == 1 and "names no parent" in done.stderr


def _tiny_block_vhd(path: Path, block_size: int, blocks: int) -> None:
    """A dynamic VHD with blocks under 4 KiB, written byte by byte from the spec (not
    by qcowlib): such blocks have no sector bitmap in the file (QEMU's size rule gives
    0 bytes); every third block is allocated and filled with its number."""

    def checksum(raw: bytearray, at: int) -> int:
        return ~(sum(raw[:at]) + sum(raw[at + 4 :])) & 0xFFFFFFFF

    size = block_size * blocks
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">IIQ", footer, 8, 2, 0x10000, 512)  # features, version, data offset
    footer[28:32] = b"qemu"
    footer[36:40] = b"Wi2k"
    struct.pack_into(">QQHBBI", footer, 40, size, size, 65535, 16, 255, 3)  # dynamic
    footer[68:84] = bytes(range(16))
    struct.pack_into(">I", footer, 64, checksum(footer, 64))
    dynamic = bytearray(1024)
    dynamic[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", dynamic, 8, 2**64 - 1, 1536, 0x10000, blocks, block_size)
    struct.pack_into(">I", dynamic, 36, checksum(dynamic, 36))
    bat = bytearray(b"\xff" * 512)
    data = bytearray()
    for i in range(0, blocks, 3):
        struct.pack_into(">I", bat, 4 * i, (2048 + len(data)) // 512)
        data += bytes([i + 1]) * block_size
    path.write_bytes(bytes(footer + dynamic + bat + data + footer))


@pytest.mark.usefixtures("qemu")
@pytest.mark.parametrize("block_size", [512, 1024, 2048])
def test_blocks_under_4k_have_no_bitmap_and_read_as_qemu_reads_them(
    tmp_path: Path, block_size: int
) -> None:
    """Blocks of 512 B-2 KiB (no bitmap in the file) are all data, as qemu-img reads and
    maps them: convert, map and the run arrays agree with qemu-img; validate agrees
    with convert."""
    img = tmp_path / "tiny.vhd"
    _tiny_block_vhd(img, block_size, 16)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    assert cli("convert", "-f", "vpc", "-O", "raw", img, ours).returncode == 0
    qemu_img("convert", "-f", "vpc", "-O", "raw", img, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.read_bytes()[:block_size] == b"\1" * block_size
    mine = json.loads(cli("map", "--output=json", "-f", "vpc", img).stdout)
    qemu = json.loads(qemu_img("map", "--output=json", "-f", "vpc", img).stdout)
    assert mine == qemu
    with qcowlib.open(img, fmt="vpc") as disk:
        for start, end in ((0, disk.virtual_size), (block_size // 2, 5 * block_size + 512)):
            assert_runs_like_extents(disk, start, end)
