"""VDI header and block map codecs (pure: no files, no qemu-img)."""

from __future__ import annotations

import contextlib
import struct
import time
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    QcowlibError,
    TruncatedImage,
    UnsupportedFeature,
)
from qcowlib.formats.vdi import codec as vdi

MiB = 1024 * 1024


def _uuids() -> st.SearchStrategy[uuid.UUID]:
    return st.builds(uuid.UUID, int=st.integers(0, (1 << 128) - 1))


@st.composite
def headers(draw: st.DrawFn) -> vdi.VdiHeader:
    offset_bmap = draw(st.integers(1, 1 << 16)) * vdi.SECTOR_SIZE
    gap = draw(st.integers(0, 1024)) * vdi.SECTOR_SIZE
    # offset_data is a 32-bit field: the map and the gap after it must fit below 4 GiB.
    most = (0xFFFFFFFF - offset_bmap - gap - vdi.SECTOR_SIZE) // 4
    blocks = draw(st.integers(0, min(vdi.VDI_BLOCKS_IN_IMAGE_MAX, most)))
    disk_size = draw(st.integers(0, blocks * vdi.DEFAULT_BLOCK_SIZE))
    data_min = offset_bmap + blocks * 4
    offset_data = -(-data_min // vdi.SECTOR_SIZE) * vdi.SECTOR_SIZE + gap
    no_nul = st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"x"))
    return vdi.VdiHeader(
        text=draw(no_nul),
        description=draw(st.binary(max_size=256).map(lambda b: b.replace(b"\0", b"-"))),
        image_type=draw(st.sampled_from([vdi.VDI_TYPE_DYNAMIC, vdi.VDI_TYPE_STATIC])),
        image_flags=draw(st.integers(0, 0xFFFFFFFF)),
        header_size=draw(st.sampled_from([vdi.HEADER_SIZE_V1_1, 0x190])),
        offset_bmap=offset_bmap,
        offset_data=offset_data,
        cylinders=draw(st.integers(0, 0xFFFFFFFF)),
        disk_size=disk_size,
        blocks_in_image=blocks,
        blocks_allocated=draw(st.integers(0, blocks)),
        uuid_image=draw(_uuids()),
        uuid_last_snap=draw(_uuids()),
    )


@given(headers())
@settings(max_examples=300)
def test_build_parse_round_trip(h: vdi.VdiHeader) -> None:
    raw = vdi.build_header(h)
    assert len(raw) == vdi.HEADER_AREA_SIZE
    assert vdi.parse_header(raw) == h
    assert vdi.build_header(vdi.parse_header(raw)) == raw


@given(st.binary(max_size=1024))
@settings(max_examples=500)
def test_arbitrary_bytes_parse_or_raise(data: bytes) -> None:
    with contextlib.suppress(QcowlibError):
        vdi.parse_header(data, len(data))


@given(st.binary(min_size=512, max_size=512), st.integers(0, 1 << 40))
@settings(max_examples=500)
def test_signed_bytes_parse_or_raise(data: bytes, file_size: int) -> None:
    blob = bytearray(data)
    struct.pack_into("<II", blob, 0x40, vdi.VDI_SIGNATURE, vdi.VDI_VERSION_1_1)
    with contextlib.suppress(QcowlibError):
        h = vdi.parse_header(blob, file_size)
        assert h.offset_bmap + h.bmap_size <= file_size


@given(st.binary(max_size=4096))
@settings(max_examples=300)
def test_arbitrary_block_map_decodes_or_raises(raw: bytes) -> None:
    n = len(raw) // 4
    h = vdi.new_header(n * MiB, static=False, blocks_allocated=0)
    with contextlib.suppress(QcowlibError):
        bmap = vdi.decode_block_map(raw, h, h.offset_data + n * MiB)
        ok = (bmap < n) | (bmap >= vdi.VDI_DISCARDED)
        assert ok.all()


def qemu_like(size: int = 5 * MiB, static: bool = False) -> vdi.VdiHeader:
    return vdi.new_header(size, static=static, blocks_allocated=0)


def test_new_header_matches_qemu_layout() -> None:
    h = qemu_like(300 * MiB)
    assert (h.offset_bmap, h.offset_data, h.blocks_in_image) == (0x200, 0x200 + 1536, 300)
    raw = vdi.build_header(h)
    assert raw[:0x23] == vdi.VDI_TEXT
    assert struct.unpack_from("<III", raw, 0x40) == (vdi.VDI_SIGNATURE, 0x00010001, 0x180)
    # UUIDs are stored in little-endian (IPRT) order.
    assert raw[0x188:0x198] == h.uuid_image.bytes_le
    assert qemu_like().uuid_image != qemu_like().uuid_image


def _poked(fmt: str, at: int, value: int) -> bytes:
    raw = bytearray(vdi.build_header(qemu_like()))
    struct.pack_into(fmt, raw, at, value)
    return bytes(raw)


@pytest.mark.parametrize(
    ("fmt", "at", "value", "error", "field"),
    [
        ("<I", 0x40, 0xDEADBEEF, FormatError, "signature"),
        ("<I", 0x44, 0x00010000, UnsupportedFeature, "version"),
        ("<I", 0x48, 0x10, CorruptImage, "header_size"),
        ("<I", 0x4C, 4, UnsupportedFeature, "image_type"),
        ("<I", 0x4C, 3, UnsupportedFeature, "image_type"),
        ("<I", 0x4C, 9, CorruptImage, "image_type"),
        ("<I", 0x154, 0x201, UnsupportedFeature, "offset_bmap"),
        ("<I", 0x154, 0x0, CorruptImage, "offset_bmap"),
        ("<I", 0x158, 0x200, CorruptImage, "offset_data"),
        ("<I", 0x168, 4096, UnsupportedFeature, "sector_size"),
        ("<Q", 0x170, 6 * MiB, CorruptImage, "disk_size"),
        ("<Q", 0x170, 1 << 62, CorruptImage, "disk_size"),
        ("<I", 0x178, 2 * MiB, UnsupportedFeature, "block_size"),
        ("<I", 0x17C, 512, UnsupportedFeature, "block_extra"),
        ("<I", 0x180, 0xFFFFFFFF, CorruptImage, "blocks_in_image"),
        ("<I", 0x184, 6, CorruptImage, "blocks_allocated"),
        ("<I", 0x1A8, 1, UnsupportedFeature, "uuid_link"),
        ("<I", 0x1B8, 1, UnsupportedFeature, "uuid_parent"),
    ],
)
def test_bad_fields(fmt: str, at: int, value: int, error: type[QcowlibError], field: str) -> None:
    with pytest.raises(error) as info:
        vdi.parse_header(_poked(fmt, at, value), 1 << 30)
    assert info.value.field == field
    assert info.value.offset == at
    assert field in str(info.value)


def test_truncated() -> None:
    raw = vdi.build_header(qemu_like())
    with pytest.raises(TruncatedImage):
        vdi.parse_header(raw[:0x47])
    with pytest.raises(TruncatedImage):
        vdi.parse_header(raw[:0x100])


def test_block_map_past_eof() -> None:
    h = qemu_like(100 * MiB)
    with pytest.raises(TruncatedImage) as info:
        vdi.parse_header(vdi.build_header(h), file_size=0x200 + 399)
    assert info.value.field == "offset_bmap"


def test_huge_block_count_is_refused_before_allocating() -> None:
    # A near-maximal count (almost 4 GiB of map) in a small file: refused at once.
    raw = bytearray(vdi.build_header(qemu_like()))
    struct.pack_into("<II", raw, 0x154, 0x200, 0xFFFFFE00)
    struct.pack_into("<I", raw, 0x180, 0x3F000000)
    t = time.monotonic()
    with pytest.raises(TruncatedImage):
        vdi.parse_header(raw, file_size=4096)
    assert time.monotonic() - t < 0.1


def test_block_map_round_trip_and_entries() -> None:
    h = qemu_like(5 * MiB).replace(blocks_allocated=2)
    bmap = np.array([vdi.VDI_UNALLOCATED, 0, vdi.VDI_DISCARDED, 1, vdi.VDI_UNALLOCATED], np.uint32)
    raw = vdi.encode_block_map(bmap)
    assert len(raw) == 512
    assert raw[:8] == b"\xff\xff\xff\xff\x00\x00\x00\x00"
    offset, length = vdi.block_map_extent(h)
    assert (offset, length) == (0x200, 20)
    decoded = vdi.decode_block_map(raw[:length], h, h.offset_data + 2 * MiB)
    assert decoded.dtype == np.uint32
    assert (decoded == bmap).all()


def test_block_index_beyond_image() -> None:
    h = qemu_like(5 * MiB)
    bmap = np.array([0, 1, 7, 2, 3], np.uint32)
    with pytest.raises(CorruptImage) as info:
        vdi.decode_block_map(vdi.encode_block_map(bmap), h)
    assert info.value.field == "entry[2]"
    assert info.value.offset == 0x200 + 8


def test_block_beyond_file() -> None:
    h = qemu_like(5 * MiB)
    bmap = np.array([0, 1, 4, 2, 3], np.uint32)
    with pytest.raises(TruncatedImage) as info:
        vdi.decode_block_map(vdi.encode_block_map(bmap), h, h.offset_data + 4 * MiB)
    assert info.value.field == "entry[2]"
    vdi.decode_block_map(vdi.encode_block_map(bmap), h, h.offset_data + 5 * MiB)


def test_short_block_map() -> None:
    with pytest.raises(TruncatedImage):
        vdi.decode_block_map(b"\0" * 8, qemu_like(5 * MiB))


def test_odd_disk_size_rounds_up() -> None:
    h = qemu_like(5 * MiB).replace(disk_size=5 * MiB - 1000)
    assert vdi.parse_header(vdi.build_header(h)).virtual_size == 5 * MiB - 512


def test_plan_layout_caps() -> None:
    assert vdi.plan_layout(0) == vdi.VdiLayout(0, 0x200, 0x200)
    assert vdi.plan_layout(129 * MiB).offset_data == 0x200 + 1024
    with pytest.raises(UnsupportedFeature):
        vdi.plan_layout(vdi.VDI_DISK_SIZE_MAX + 1)
