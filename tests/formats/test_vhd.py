"""Pure VHD structures: footer and dynamic header codecs, geometry, BAT and bitmaps."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import CorruptImage, FormatError, QcowlibError, TruncatedImage
from qcowlib.formats.vhd import codec as vhd

FOOTER = vhd.Footer(
    features=2,
    version=0x10000,
    data_offset=512,
    timestamp=848919914,
    creator_app=b"qemu",
    creator_ver=0x50003,
    creator_os=b"Wi2k",
    orig_size=10027008,
    current_size=10027008,
    cyls=288,
    heads=4,
    secs_per_cyl=17,
    type=vhd.VHD_TYPE_DYNAMIC,
    checksum=0,
    uuid=bytes(range(16)),
    in_saved_state=0,
)

footers = st.builds(
    vhd.Footer,
    features=st.integers(0, 2**32 - 1),
    version=st.integers(0, 2**32 - 1),
    data_offset=st.integers(0, 2**64 - 1),
    timestamp=st.integers(0, 2**32 - 1),
    creator_app=st.binary(min_size=4, max_size=4),
    creator_ver=st.integers(0, 2**32 - 1),
    creator_os=st.binary(min_size=4, max_size=4),
    orig_size=st.integers(0, 2**64 - 1),
    current_size=st.integers(0, 2**64 - 1),
    cyls=st.integers(0, 65535),
    heads=st.integers(0, 255),
    secs_per_cyl=st.integers(0, 255),
    type=st.integers(0, 2**32 - 1),
    checksum=st.just(0),
    uuid=st.binary(min_size=16, max_size=16),
    in_saved_state=st.integers(0, 255),
)


@given(footers)
def test_footer_round_trip(f: vhd.Footer) -> None:
    raw = vhd.build_footer(f)
    assert len(raw) == vhd.FOOTER_SIZE
    back = vhd.parse_footer(raw)
    assert back == replace(f, checksum=vhd.footer_checksum(raw))


@given(st.binary(max_size=600), st.booleans())
@settings(max_examples=300)
def test_footer_parse_or_raise(data: bytes, cookie: bool) -> None:
    if cookie:
        data = vhd.VHD_COOKIE + data
    with contextlib.suppress(QcowlibError):
        vhd.parse_footer(data)


@given(st.binary(max_size=1100), st.booleans())
@settings(max_examples=300)
def test_dynamic_header_parse_or_raise(data: bytes, cookie: bool) -> None:
    if cookie:
        data = vhd.VHD_DYNAMIC_COOKIE + data
    with contextlib.suppress(QcowlibError):
        h = vhd.parse_dynamic_header(data)
        vhd.check_dynamic(h, 10 << 20, 1 << 30)


def test_footer_errors_name_field_and_offset() -> None:
    raw = bytearray(vhd.build_footer(FOOTER))
    with pytest.raises(TruncatedImage):
        vhd.parse_footer(bytes(raw[:100]))
    bad = bytearray(raw)
    bad[0] = ord("X")
    with pytest.raises(FormatError) as exc:
        vhd.parse_footer(bytes(bad), 4096)
    assert exc.value.field == "cookie" and exc.value.offset == 4096
    raw[48] ^= 1
    with pytest.raises(CorruptImage) as cexc:
        vhd.parse_footer(bytes(raw), 4096)
    assert cexc.value.field == "checksum" and cexc.value.offset == 4096 + 64
    assert vhd.parse_footer(bytes(raw), check_checksum=False).current_size != FOOTER.current_size


def test_checksum_matches_spec_definition() -> None:
    raw = vhd.build_footer(FOOTER)
    total = sum(raw[:64]) + sum(raw[68:])
    assert int.from_bytes(raw[64:68], "big") == ~total & 0xFFFFFFFF


def test_dynamic_header_round_trip() -> None:
    h = vhd.DynamicHeader(
        data_offset=vhd.NO_DATA_OFFSET,
        table_offset=1536,
        version=0x10000,
        max_table_entries=5,
        block_size=vhd.DEFAULT_BLOCK_SIZE,
        checksum=0,
        parent_name="p.vhd".encode("utf-16-be").ljust(512, b"\0"),
    )
    raw = vhd.build_dynamic_header(h)
    back = vhd.parse_dynamic_header(raw)
    assert back == replace(h, checksum=vhd.dynamic_header_checksum(raw))
    assert back.parent_name_text == "p.vhd"


# (sectors requested, geometry qemu-img create writes) -- checked against qemu-img 7.2.
GEOMETRY = [
    (1, (1, 4, 17)),
    (2048, (31, 4, 17)),
    (19532, (288, 4, 17)),
    (6291457, (6242, 16, 63)),
    (266338304, (65279, 16, 255)),
    (419430408, (65535, 16, 255)),
]


@pytest.mark.parametrize(("sectors", "chs"), GEOMETRY)
def test_create_geometry(sectors: int, chs: tuple[int, int, int]) -> None:
    c, h, s, total = vhd.create_geometry(sectors * 512)
    assert (c, h, s) == chs
    assert total >= sectors
    if c * h * s == vhd.VHD_MAX_GEOMETRY:
        assert total == sectors
    else:
        assert total == c * h * s


@given(st.integers(1, vhd.VHD_MAX_GEOMETRY))
def test_geometry_covers_size(sectors: int) -> None:
    c, h, s = vhd.calculate_geometry(sectors)
    assert c * h * s <= sectors
    c, h, s, total = vhd.create_geometry(sectors * 512)
    assert total >= sectors


def test_create_geometry_force_size_and_cap() -> None:
    assert vhd.create_geometry(10000384, force_size=True) == (65535, 16, 255, 19532)
    with pytest.raises(QcowlibError):
        vhd.create_geometry((vhd.VHD_MAX_SECTORS + 1) * 512)


@pytest.mark.parametrize(
    ("creator", "expected"),
    [(b"qemu", 288 * 4 * 17 * 512), (b"vpc ", 288 * 4 * 17 * 512), (b"qem2", 10000384)]
    + [(c, 10000384) for c in (b"win ", b"d2v ", b"CTXS", b"tap\0")],
)
def test_virtual_size_rules(creator: bytes, expected: int) -> None:
    f = replace(FOOTER, creator_app=creator, current_size=10000384)
    assert vhd.virtual_size(f) == expected


def test_virtual_size_max_geometry_uses_current_size() -> None:
    f = replace(FOOTER, cyls=65535, heads=16, secs_per_cyl=255, current_size=1 << 30)
    assert vhd.virtual_size(f) == 1 << 30
    with pytest.raises(QcowlibError):
        vhd.virtual_size(replace(f, current_size=(vhd.VHD_MAX_SECTORS + 1) * 512))


def test_check_dynamic() -> None:
    h = vhd.DynamicHeader(vhd.NO_DATA_OFFSET, 1536, 0x10000, 5, 1 << 21, 0)
    vhd.check_dynamic(h, 10 << 20, 4096)
    with pytest.raises(CorruptImage, match="power of two"):
        vhd.check_dynamic(replace(h, block_size=3000), 10 << 20, 4096)
    with pytest.raises(CorruptImage, match="too small"):
        vhd.check_dynamic(h, 20 << 20, 4096)
    with pytest.raises(CorruptImage, match="too large"):
        vhd.check_dynamic(replace(h, max_table_entries=1 << 30), 10 << 20, 1 << 40)
    with pytest.raises(TruncatedImage):
        vhd.check_dynamic(replace(h, table_offset=4090), 10 << 20, 4096)


def test_bat_codec_and_check() -> None:
    bat = np.array([3, vhd.BAT_UNALLOCATED, 4100], dtype=np.uint32)
    raw = vhd.encode_bat(bat)
    assert len(raw) == 512 and raw[:4] == b"\0\0\0\3" and raw[12:] == b"\xff" * 500
    assert np.array_equal(vhd.decode_bat(raw, 3), bat)
    with pytest.raises(TruncatedImage):
        vhd.decode_bat(raw[:8], 3)
    bs = 1 << 21
    vhd.check_bat(bat[:2], bs, 3 * 512 + 512 + bs, 1536)
    with pytest.raises(TruncatedImage) as exc:
        vhd.check_bat(bat, bs, 3 * 512 + 512 + bs, 1536)
    assert exc.value.field == "entry[2]" and exc.value.offset == 1536 + 8


def test_bitmap() -> None:
    assert vhd.bitmap_size(1 << 21) == 512
    assert vhd.bitmap_size(4096) == 512
    raw = bytes([0xFF, 0x0F, 0x80]) + bytes(509)
    starts, is_set = vhd.bitmap_runs(raw, 4096)
    assert starts.tolist() == [0, 8, 12, 17]
    assert is_set.tolist() == [True, False, True, False]
    starts, is_set = vhd.bitmap_runs(b"\xff" * 512, 4096)
    assert starts.tolist() == [0] and is_set.tolist() == [True]
