"""``check`` of VMDK, VDI and VHDX images against ``qemu-img check`` on the same files.

Clean images made by qemu-img in every subformat, and images corrupted by poking bytes
at known offsets: exit status, JSON and human output and the stderr lines must be
qemu-img's (stderr lines that qemu prints through ``error_report`` carry its program
name, which is ours here).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import cli, qemu_img, qemu_io, require_qemu

CLEAN = [
    ("vmdk", "subformat=monolithicSparse"),
    ("vmdk", "subformat=streamOptimized"),
    ("vmdk", "subformat=twoGbMaxExtentSparse"),
    ("vmdk", "subformat=monolithicFlat"),
    ("vdi", "static=off"),
    ("vdi", "static=on"),
    ("vhdx", "subformat=dynamic"),
    ("vhdx", "subformat=fixed"),
]


def _same_as_qemu(path: Path, *args: str) -> tuple[str, str]:
    """Run both checks; assert equal exit status and stdout; return both stderrs."""
    ours = cli("check", *args, path)
    theirs = qemu_img("check", *args, path, check=False)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert ours.stdout == theirs.stdout
    return ours.stderr, theirs.stderr


@pytest.mark.parametrize(("fmt", "options"), CLEAN)
def test_clean_images_check_as_qemu(tmp_path: Path, fmt: str, options: str) -> None:
    require_qemu()
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, "-o", options, path, "64M")
    if "streamOptimized" not in options:
        qemu_io(path, fmt, "write -P 0x5a 0 1M", "write -P 0x11 40M 64k")
    for args in ((), ("--output=json",)):
        ours, theirs = _same_as_qemu(path, *args)
        assert ours == theirs == ""
    assert json.loads(cli("check", "--output=json", path).stdout)["format"] == fmt


@pytest.mark.parametrize("fmt", ["vmdk", "vdi"])
def test_repair_is_refused_as_by_qemu(tmp_path: Path, fmt: str) -> None:
    require_qemu()
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, path, "16M")
    before = path.read_bytes()
    ours = cli("check", "-r", "all", path)
    assert ours.returncode == qemu_img("check", "-r", "all", path, check=False).returncode == 63
    assert path.read_bytes() == before


# -- VDI -----------------------------------------------------------------------------------


def _vdi(tmp_path: Path) -> tuple[Path, int, int]:
    """A dynamic VDI with blocks 0, 1 and 40 allocated; (path, bmap offset, header at)."""
    path = tmp_path / "disk.vdi"
    qemu_img("create", "-q", "-f", "vdi", path, "64M")
    qemu_io(path, "vdi", "write -P 1 0 2M", "write -P 2 40M 1M")
    raw = path.read_bytes()
    bmap_at = struct.unpack_from("<I", raw, 0x154)[0]
    return path, bmap_at, 0x184  # cBlocksAllocated (VDI 1.1 header)


def _poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "poke",
    [
        "too-large",  # an entry past blocks_in_image
        "shared",  # two entries naming the same block
        "count",  # blocks_allocated disagrees with the map
        "all",
    ],
)
def test_vdi_corruptions_are_counted_as_by_qemu(tmp_path: Path, poke: str) -> None:
    require_qemu()
    path, bmap_at, count_at = _vdi(tmp_path)
    if poke in ("too-large", "all"):
        _poke(path, bmap_at + 4 * 5, struct.pack("<I", 1000))
    if poke in ("shared", "all"):
        _poke(path, bmap_at + 4 * 7, struct.pack("<I", 1))
    if poke in ("count", "all"):
        _poke(path, count_at, struct.pack("<I", 9))
    for args in ((), ("--output=json",)):
        ours, theirs = _same_as_qemu(path, *args)
        assert ours == theirs and ours.startswith("ERROR: ")


# -- VMDK ----------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse"])
def test_vmdk_grain_past_eof_fails_as_in_qemu(tmp_path: Path, subformat: str) -> None:
    require_qemu()
    path = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", path, "64M")
    qemu_io(path, "vmdk", "write -P 1 0 128k", "write -P 2 10M 64k")
    extent = path if subformat == "monolithicSparse" else tmp_path / "disk-s001.vmdk"
    head = extent.read_bytes()[:512]
    gd_sector = struct.unpack_from("<Q", head, 56)[0]
    gt_sector = struct.unpack_from("<I", extent.read_bytes(), gd_sector * 512)[0]
    _poke(extent, gt_sector * 512 + 4, struct.pack("<I", 10**6))  # grain 1: past EOF
    ours, theirs = _same_as_qemu(path)
    assert ours.splitlines()[0] == theirs.splitlines()[0]
    assert ours.splitlines()[0] == "ERROR: cluster offset for sector 128 points after EOF"
    assert "Check failed: Invalid argument" in ours


# -- VHDX ----------------------------------------------------------------------------------


def _vhdx_bat(path: Path) -> tuple[int, int]:
    """(BAT offset, metadata region offset) from the region table at 192 KiB."""
    raw = path.read_bytes()[192 * 1024 : 192 * 1024 + 64 * 1024]
    count = struct.unpack_from("<I", raw, 8)[0]
    found = {}
    for i in range(count):
        guid = raw[16 + 32 * i : 32 + 32 * i]
        found[guid.hex()] = struct.unpack_from("<Q", raw, 32 + 32 * i)[0]
    bat = found["6677c22d23f600429d64115e9bfd4a08"]
    meta = found["06a27c8b90479a4bb8fe575f050f886e"]
    return bat, meta


@pytest.mark.parametrize("where", ["past-eof", "overlaps-metadata", "partly-past-eof"])
def test_vhdx_bad_bat_entries_are_counted_as_by_qemu(tmp_path: Path, where: str) -> None:
    require_qemu()
    path = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", path, "64M")
    qemu_io(path, "vhdx", "write -P 1 0 1M")
    bat_at, meta_at = _vhdx_bat(path)
    size = path.stat().st_size
    target = {
        "past-eof": size + (64 << 20),
        "overlaps-metadata": meta_at,
        "partly-past-eof": (size - (1 << 20)) & ~((1 << 20) - 1),
    }[where]
    _poke(path, bat_at + 8, struct.pack("<Q", target | 6))  # block 1: fully present
    for args in ((), ("--output=json",)):
        ours, theirs = _same_as_qemu(path, *args)
        assert ours.replace("qcowlib: ", "") == theirs.replace("qemu-img: ", "")
        assert ours
