"""Differencing VHDX images (Hyper-V checkpoints, ``.avhdx``) read over their parent.

qemu-img neither writes nor reads differencing VHDX, so the child is laid out as the
VHDX specification (2.6.2.6, 2.5) describes and Hyper-V writes it: a dynamic VHDX
written by qemu-io, then given the ``HasParent`` flag, a parent locator metadata item
(``parent_linkage``, ``relative_path``, ``absolute_win32_path``) and, for one block, the
``PARTIALLY_PRESENT`` state with a sector bitmap block.  The expected disk is computed
independently from qemu-img's reads of the parent and of the child as a dynamic disk.
"""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import pytest

from tests.conftest import cli, qemu_img, qemu_io, require_qemu

MiB = 1 << 20
SIZE = 8 * MiB
BLOCK = MiB
RATIO = (1 << 23) * 512 // BLOCK  # chunk ratio for 512-byte logical sectors
LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913").bytes_le
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
BAT_REGION = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le


def _regions(raw: bytes) -> dict[bytes, int]:
    table = raw[192 * 1024 : 256 * 1024]
    count = struct.unpack_from("<I", table, 8)[0]
    return {
        table[16 + 32 * i : 32 + 32 * i]: struct.unpack_from("<Q", table, 32 + 32 * i)[0]
        for i in range(count)
    }


def _data_write_guid(raw: bytes) -> str:
    """The current header's DataWriteGuid (the header with the higher sequence number)."""
    heads = [raw[at : at + 4096] for at in (64 * 1024, 128 * 1024)]
    current = max(heads, key=lambda h: struct.unpack_from("<Q", h, 8)[0])
    return str(uuid.UUID(bytes_le=current[32:48])).upper()


def _locator(pairs: dict[str, str]) -> bytes:
    head = LOCATOR_TYPE + struct.pack("<HH", 0, len(pairs))
    strings = bytearray()
    entries = bytearray()
    base = len(head) + 12 * len(pairs)
    for key, value in pairs.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        entries += struct.pack(
            "<IIHH", base + len(strings), base + len(strings) + len(k), len(k), len(v)
        )
        strings += k + v
    return head + entries + strings


def _bat_states(raw: bytes, bat_at: int) -> list[int]:
    blocks = SIZE // BLOCK
    return [
        struct.unpack_from("<Q", raw, bat_at + 8 * (b + b // RATIO))[0] & 7 for b in range(blocks)
    ]


def _make(
    tmp_path: Path, pairs: dict[str, str] | None = None, *, partial: bytes | None = None
) -> tuple[Path, Path, bytes]:
    """(parent, child, expected guest bytes of the child)."""
    parent = tmp_path / "parent.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, str(SIZE))
    qemu_io(parent, "vhdx", "write -P 0xaa 0 5M", "write -P 0xa5 7M 1M")
    child = tmp_path / "child.avhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", child, str(SIZE))
    qemu_io(child, "vhdx", "write -P 0xbb 1M 64k", "write -P 0xcc 3M 1M")
    expected = bytearray(_raw(tmp_path, parent))
    mine = _raw(tmp_path, child, "vhdx")
    raw = bytearray(child.read_bytes())
    regions = _regions(bytes(raw))
    meta_at, bat_at = regions[METADATA_REGION], regions[BAT_REGION]
    states = _bat_states(bytes(raw), bat_at)
    for b, state in enumerate(states):
        span = slice(b * BLOCK, (b + 1) * BLOCK)
        if state == 6:
            expected[span] = mine[span]
        elif b == 7:  # ZERO (qemu-img's state for untouched blocks): zeros, not the parent's
            expected[span] = bytes(BLOCK)
        else:  # NOT_PRESENT, as Hyper-V leaves untouched blocks: the parent's data
            struct.pack_into("<Q", raw, bat_at + 8 * (b + b // RATIO), 0)
    # HasParent and the parent locator item.
    count = struct.unpack_from("<H", raw, meta_at + 10)[0]
    end = 0
    for i in range(count):
        at = meta_at + 32 + 32 * i
        item, off, length = raw[at : at + 16], *struct.unpack_from("<II", raw, at + 16)
        end = max(end, off + length)
        if item == FILE_PARAMETERS:
            bits_at = meta_at + off + 4
            raw[bits_at] |= 2
    if pairs is None:
        pairs = {
            "parent_linkage": "{" + _data_write_guid(parent.read_bytes()) + "}",
            "relative_path": ".\\parent.vhdx",
            "absolute_win32_path": "C:\\Hyper-V\\parent.vhdx",
        }
    locator = _locator(pairs)
    item_at = -(-end // 8) * 8
    raw[meta_at + item_at : meta_at + item_at + len(locator)] = locator
    entry = meta_at + 32 + 32 * count
    raw[entry : entry + 32] = PARENT_LOCATOR + struct.pack("<IIII", item_at, len(locator), 4, 0)
    struct.pack_into("<H", raw, meta_at + 10, count + 1)
    if partial is not None:  # block 3 takes the sectors whose bits are set from here
        sb_at = -(-len(raw) // MiB) * MiB
        raw.extend(bytes(sb_at - len(raw) + MiB))
        raw[sb_at + 3 * 256 : sb_at + 3 * 256 + len(partial)] = partial
        struct.pack_into("<Q", raw, bat_at + 8 * RATIO, sb_at | 6)
        struct.pack_into(
            "<Q", raw, bat_at + 8 * 3, (struct.unpack_from("<Q", raw, bat_at + 24)[0] & ~7) | 7
        )
        for sector in range(BLOCK // 512):
            at = 3 * BLOCK + sector * 512
            here = partial[sector // 8] >> (sector % 8) & 1 if sector // 8 < len(partial) else 0
            expected[at : at + 512] = (mine if here else _raw(tmp_path, parent))[at : at + 512]
    child.write_bytes(raw)
    return parent, child, bytes(expected)


_CACHE: dict[Path, bytes] = {}


def _raw(tmp_path: Path, image: Path, fmt: str | None = None) -> bytes:
    if image not in _CACHE or fmt is not None:
        out = tmp_path / f"{image.name}.raw"
        qemu_img("convert", *(("-f", fmt) if fmt else ()), "-O", "raw", image, out)
        _CACHE[image] = out.read_bytes()
    return _CACHE[image]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    _CACHE.clear()


def test_differencing_vhdx_reads_over_its_parent(tmp_path: Path) -> None:
    require_qemu()
    _, child, expected = _make(tmp_path)
    out = tmp_path / "out.raw"
    done = cli("convert", "-O", "raw", child, out)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == expected
    assert expected[0] == 0xAA and expected[MiB] == 0xBB and expected[3 * MiB] == 0xCC
    assert expected[7 * MiB] == 0  # a ZERO block hides the parent's 0xa5
    info = json.loads(cli("info", "--output=json", child).stdout)
    assert info["backing-filename"] == "parent.vhdx"
    assert info["backing-filename-format"] == "vhdx"
    flat = tmp_path / "flat.qcow2"
    assert cli("flatten", child, flat).returncode == 0
    assert qemu_img("compare", "-F", "raw", flat, out).returncode == 0


def test_partially_present_blocks_mix_sectors_by_the_bitmap(tmp_path: Path) -> None:
    require_qemu()
    bits = bytes([0b00001111, 0, 0xFF, 0b10000000])
    _, child, expected = _make(tmp_path, partial=bits)
    out = tmp_path / "out.raw"
    assert cli("convert", "-O", "raw", child, out).returncode == 0
    assert out.read_bytes() == expected
    assert expected[3 * MiB] == 0xCC and expected[3 * MiB + 4 * 512] == 0xAA
    depths = {e["depth"] for e in json.loads(cli("map", "--output=json", child).stdout)}
    assert depths == {0, 1}


def test_an_absolute_path_alone_is_looked_for_beside_the_child(tmp_path: Path) -> None:
    require_qemu()
    parent = tmp_path / "parent.vhdx"
    _, child, expected = _make(tmp_path, {"absolute_win32_path": "D:\\VMs\\parent.vhdx"})
    assert parent.exists()
    out = tmp_path / "out.raw"
    assert cli("convert", "-O", "raw", child, out).returncode == 0
    assert out.read_bytes() == expected


def test_another_parent_is_refused_by_its_linkage(tmp_path: Path) -> None:
    require_qemu()
    _, child, _ = _make(tmp_path)
    parent = tmp_path / "parent.vhdx"
    parent.unlink()
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, str(SIZE))
    done = cli("convert", "-O", "raw", child, tmp_path / "x.raw")
    assert done.returncode == 1 and "parent_linkage" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_child_without_a_usable_locator_is_refused(tmp_path: Path) -> None:
    require_qemu()
    _, child, _ = _make(tmp_path, {"parent_linkage": "{00000000-0000-0000-0000-000000000000}"})
    done = cli("info", child)
    assert done.returncode == 1 and "names no parent" in done.stderr
