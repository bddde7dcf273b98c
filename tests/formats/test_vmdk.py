"""VMDK header, table, marker and descriptor codecs (pure: no files, no qemu-img)."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import CorruptImage, FormatError, QcowlibError, TruncatedImage
from qcowlib.formats.vmdk import codec as vmdk


@st.composite
def headers(draw: st.DrawFn) -> vmdk.SparseExtentHeader:
    return vmdk.SparseExtentHeader(
        version=draw(st.integers(1, 3)),
        flags=draw(st.integers(0, 0xFFFFFFFF)) & ~vmdk.VMDK4_FLAG_COMPRESS | vmdk.VMDK4_FLAG_MARKER,
        capacity=draw(st.integers(0, vmdk.VMDK_CAPACITY_MAX)),
        grain_size=1 << draw(st.integers(0, 16)),
        desc_offset=draw(st.integers(0, 1 << 64 - 1)),
        desc_size=draw(st.integers(0, 1 << 64 - 1)),
        num_gtes_per_gt=draw(st.integers(1, 512)),
        rgd_offset=draw(st.integers(0, (1 << 64) - 1)),
        gd_offset=draw(st.integers(0, (1 << 64) - 1)),
        grain_offset=draw(st.integers(0, (1 << 64) - 1)),
        compress_algorithm=draw(st.sampled_from([0, 1])),
        unclean_shutdown=draw(st.integers(0, 255)),
    )


@given(headers())
@settings(max_examples=300)
def test_build_parse_round_trip(h: vmdk.SparseExtentHeader) -> None:
    raw = vmdk.build_header(h)
    assert len(raw) == vmdk.SECTOR
    assert vmdk.parse_header(raw) == h
    assert vmdk.build_header(vmdk.decode_header(raw)) == raw


@given(st.binary(max_size=1024), st.integers(0, 1 << 40))
@settings(max_examples=500)
def test_arbitrary_bytes_parse_or_raise(data: bytes, size: int) -> None:
    with contextlib.suppress(QcowlibError):
        vmdk.parse_header(data, size)
    with contextlib.suppress(QcowlibError):
        vmdk.parse_header(b"KDMV" + data, size)
    with contextlib.suppress(QcowlibError):
        vmdk.stream_footer_header(data, size)


@given(st.binary(max_size=2048))
@settings(max_examples=500)
def test_arbitrary_descriptor_parses_or_raises(data: bytes) -> None:
    with contextlib.suppress(QcowlibError):
        vmdk.parse_descriptor(data)
        vmdk.parse_descriptor(b'createType="x"\nRW 1 FLAT "' + data + b'" 0\nddb.a = "' + data)


def _header(**kw: int) -> bytes:
    h = vmdk.SparseExtentHeader(1, 3, 20480, 128, 1, 20, 512, 21, 26, 128, 0)
    return vmdk.build_header(h.replace(**kw))


@pytest.mark.parametrize(
    ("changes", "error", "field"),
    [
        ({"version": 4}, QcowlibError, "version"),
        ({"grain_size": 3}, CorruptImage, "grain_size"),
        ({"grain_size": 1 << 17}, CorruptImage, "grain_size"),
        ({"num_gtes_per_gt": 513}, CorruptImage, "num_gtes_per_gt"),
        ({"capacity": 1 << 62}, CorruptImage, "capacity"),
        ({"gd_offset": 1 << 40}, TruncatedImage, "gd_offset"),
        ({"compress_algorithm": 7}, QcowlibError, "compress_algorithm"),
    ],
)
def test_bad_fields(changes: dict[str, int], error: type[QcowlibError], field: str) -> None:
    with pytest.raises(error) as info:
        vmdk.parse_header(_header(**changes), 1 << 20)
    assert info.value.field == field and info.value.offset is not None


def test_bad_magic_and_truncated() -> None:
    with pytest.raises(FormatError, match="magic"):
        vmdk.parse_header(b"XDMV" + _header()[4:])
    with pytest.raises(TruncatedImage):
        vmdk.parse_header(_header()[:40])


def test_tables_and_markers() -> None:
    t = np.array([0, 1, 0x12345678], dtype=np.uint32)
    raw = vmdk.encode_table(t)
    assert len(raw) == 512 and raw[:12] == struct.pack("<3I", 0, 1, 0x12345678)
    assert (vmdk.decode_table(raw, 3) == t).all()
    with pytest.raises(TruncatedImage):
        vmdk.decode_table(raw[:8], 3)
    m = vmdk.parse_marker(vmdk.build_marker(vmdk.MARKER_GT, 4))
    assert (m.val, m.size, m.type) == (4, 0, vmdk.MARKER_GT)
    gm = vmdk.build_grain_marker(128, b"xyz")
    assert len(gm) == 512 and vmdk.parse_grain_marker(gm) == (128, 3)
    grain = bytes(range(256)) * 256
    assert vmdk.decompress_grain(vmdk.compress_grain(grain), len(grain)) == grain
    with pytest.raises(CorruptImage):
        vmdk.decompress_grain(b"not zlib", 65536)


def test_stream_footer() -> None:
    footer = _header(version=3, gd_offset=30, grain_offset=0)
    tail = vmdk.build_marker(vmdk.MARKER_FOOTER, 1) + footer + vmdk.build_marker(0)
    assert vmdk.stream_footer_header(tail, 1 << 20).gd_offset == 30
    with pytest.raises(CorruptImage):
        vmdk.stream_footer_header(bytes(512) + footer + bytes(512), 1 << 20)
    with pytest.raises(TruncatedImage):
        vmdk.stream_footer_header(tail[:1000], 1000)
    again = vmdk.build_marker(vmdk.MARKER_FOOTER, 1) + _header(gd_offset=-1 & (2**64 - 1))
    with pytest.raises(CorruptImage, match="another footer"):
        vmdk.stream_footer_header(again + vmdk.build_marker(0), 1 << 20)


def test_descriptor_round_trip() -> None:
    raw = vmdk.build_descriptor(
        create_type="monolithicFlat",
        extents=[("RW", 2048, "FLAT", "d-flat.vmdk", 0), ("RW", 10, "ZERO", None, None)],
        cid=0x1234ABCD,
        ddb=[("ddb.adapterType", "lsilogic"), ("ddb.virtualHWVersion", "4")],
    )
    d = vmdk.parse_descriptor(raw)
    assert d.create_type == "monolithicFlat" and d.cid == 0x1234ABCD
    assert d.parent_cid == 0xFFFFFFFF and d.parent_file_name_hint is None
    assert d.adapter_type == "lsilogic" and d.virtual_hw_version == "4"
    assert [(e.access, e.sectors, e.type, e.filename, e.offset) for e in d.extents] == [
        ("RW", 2048, "FLAT", "d-flat.vmdk", 0),
        ("RW", 10, "ZERO", None, None),
    ]
    assert not d.unsupported_lines
    with pytest.raises(CorruptImage):
        vmdk.build_descriptor(create_type='a"b', extents=[], cid=0)
