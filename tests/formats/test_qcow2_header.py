"""qcow2 header: build/parse round trips, caps, and "parse or raise QcowlibError"."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import CorruptImage, FormatError, QcowlibError, UnsupportedFeature
from qcowlib.formats.qcow2 import extensions as hext
from qcowlib.formats.qcow2 import header as hdr


def make_header(**changes: object) -> hdr.Header:
    base = hdr.Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=16,
        size=1 << 30,
        crypt_method=0,
        l1_size=2,
        l1_table_offset=0x30000,
        refcount_table_offset=0x10000,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        header_length=112,
    )
    return base.replace(**changes)


@st.composite
def headers(draw: st.DrawFn) -> hdr.Header:
    version = draw(st.sampled_from([2, 3]))
    cluster_bits = draw(st.integers(9, 21))
    cs = 1 << cluster_bits
    extended = version == 3 and cluster_bits >= 14 and draw(st.booleans())
    entry = 16 if extended else 8
    size = draw(st.integers(0, 1 << 40)) // 512 * 512
    l1_needed = hdr.l1_entries_needed(size, cluster_bits, entry)
    if l1_needed * 8 > hdr.MAX_L1_SIZE_BYTES:
        size = 0
        l1_needed = 0
    l1_size = l1_needed + draw(st.integers(0, 4))
    incompat = hdr.INCOMPAT_EXTL2 if extended else 0
    compression = 0
    fields: dict[str, object] = {}
    exts: list[hext.HeaderExtension] = []
    if version == 3:
        incompat |= draw(st.sampled_from([0, hdr.INCOMPAT_DIRTY, hdr.INCOMPAT_CORRUPT]))
        if draw(st.booleans()):
            compression = hdr.COMPRESSION_TYPE_ZSTD
            incompat |= hdr.INCOMPAT_COMPRESSION
        fields = {
            "incompatible_features": incompat,
            "compatible_features": draw(st.sampled_from([0, hdr.COMPAT_LAZY_REFCOUNTS])),
            "autoclear_features": 0,
            "refcount_order": draw(st.integers(0, 6)),
            "header_length": 112,
            "compression_type": compression,
        }
    backing_format = None
    if draw(st.booleans()):
        backing_format = draw(st.sampled_from(["qcow2", "raw"]))
        exts.append(hext.extension(hext.EXT_BACKING_FORMAT, backing_format.encode()))
    if draw(st.booleans()):
        exts.append(hext.extension(0x12345678, draw(st.binary(max_size=40))))
    backing = draw(st.none() | st.text("abcdef./_-", min_size=1, max_size=60))
    header_end = (
        (112 if version == 3 else 72) + sum(8 + (len(e.data) + 7) // 8 * 8 for e in exts) + 8
    )
    h = hdr.Header(
        version=version,
        backing_file_offset=header_end if backing else 0,
        backing_file_size=len(backing.encode()) if backing else 0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=3 * cs,
        refcount_table_offset=cs,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        backing_file=backing or None,
        backing_format=backing_format,
        extensions=tuple(exts),
        **fields,  # type: ignore[arg-type]
    )
    return h


@given(headers())
@settings(max_examples=200)
def test_build_parse_round_trip(h: hdr.Header) -> None:
    raw = hdr.build_header(h)
    parsed = hdr.parse_header(raw.ljust(h.cluster_size, b"\0"))
    for name in (
        "version", "cluster_bits", "size", "l1_size", "l1_table_offset", "refcount_table_offset",
        "refcount_table_clusters", "incompatible_features", "compatible_features",
        "refcount_order", "compression_type", "backing_file", "backing_format",
    ):  # fmt: skip
        assert getattr(parsed, name) == getattr(h, name), name
    assert parsed.extensions == h.extensions
    # and building the parsed header gives the same bytes again
    assert hdr.build_header(parsed) == raw


@given(st.binary(max_size=4096))
@settings(max_examples=500)
def test_arbitrary_bytes_parse_or_raise(data: bytes) -> None:
    with contextlib.suppress(QcowlibError):
        hdr.parse_header(data)


@given(st.binary(min_size=104, max_size=2048))
@settings(max_examples=500)
def test_magic_prefixed_bytes_parse_or_raise(data: bytes) -> None:
    for version in (2, 3):
        blob = hdr.QCOW_MAGIC + struct.pack(">I", version) + data[8:]
        with contextlib.suppress(QcowlibError):
            hdr.parse_header(blob, file_size=len(blob) * 4)


def _poke(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(raw.ljust(65536, b"\0"))
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


GOOD = hdr.build_header(make_header())


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "error", "field"),
    [
        (0, ">I", 0x12345678, FormatError, "magic"),
        (4, ">I", 4, UnsupportedFeature, "version"),
        (20, ">I", 8, CorruptImage, "cluster_bits"),
        (20, ">I", 22, CorruptImage, "cluster_bits"),
        (36, ">I", 0xFFFFFFFF, CorruptImage, "l1_size"),
        (36, ">I", 1, CorruptImage, "l1_size"),
        (40, ">Q", 0x30001, CorruptImage, "l1_table_offset"),
        (56, ">I", 1 << 20, CorruptImage, "refcount_table_clusters"),
        (72, ">Q", 1 << 40, UnsupportedFeature, "incompatible_features"),
        (96, ">I", 7, CorruptImage, "refcount_order"),
        (100, ">I", 101, CorruptImage, "header_length"),
        (32, ">I", 9, CorruptImage, "crypt_method"),
        (16, ">I", 4096, CorruptImage, "backing_file_size"),
    ],
)
def test_bad_fields(offset: int, fmt: str, value: int, error: type[Exception], field: str) -> None:
    raw = _poke(GOOD, offset, fmt, value)
    if field == "backing_file_size":
        raw = _poke(raw, 8, ">Q", 0x200)
    with pytest.raises(error) as info:
        hdr.parse_header(raw)
    assert isinstance(info.value, QcowlibError)
    assert info.value.field == field


def test_table_past_end_of_file() -> None:
    with pytest.raises(QcowlibError) as info:
        hdr.parse_header(GOOD, file_size=0x20000)
    assert info.value.field == "l1_table_offset"


def test_extension_length_overflow() -> None:
    h = make_header(extensions=(hext.extension(0x1234, b"abcd"),))
    raw = bytearray(hdr.build_header(h).ljust(65536, b"\0"))
    struct.pack_into(">I", raw, 112 + 4, 0xFFFFFFF0)
    with pytest.raises(CorruptImage) as info:
        hdr.parse_header(bytes(raw))
    assert info.value.structure == "header extension"


def test_unknown_extension_kept_and_feature_names() -> None:
    table = hext.feature_table_extension([(0, 0, "dirty bit"), (0, 9, "future")])
    h = make_header(
        extensions=(hext.extension(0xABCDEF01, b"xyz"), table),
        incompatible_features=1 << 9,
    )
    raw = hdr.build_header(h).ljust(65536, b"\0")
    with pytest.raises(UnsupportedFeature, match="future"):
        hdr.parse_header(raw)
    ok = hdr.parse_header(hdr.build_header(h.replace(incompatible_features=0)).ljust(65536, b"\0"))
    assert ok.extensions[0] == hext.HeaderExtension(0xABCDEF01, b"xyz")
    assert (0, 9, "future") in ok.feature_names
