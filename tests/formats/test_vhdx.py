"""Pure VHDX structures: headers, region table, metadata and BAT codecs and checks."""

from __future__ import annotations

import contextlib

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
from qcowlib.formats.vhdx import codec as vhdx

MIB = 1 << 20

HEADER = vhdx.Header(
    sequence_number=7,
    file_write_guid=bytes(range(16)),
    data_write_guid=bytes(range(16, 32)),
    log_guid=bytes(16),
    log_version=0,
    version=1,
    log_length=MIB,
    log_offset=MIB,
)

headers = st.builds(
    vhdx.Header,
    sequence_number=st.integers(0, 2**64 - 1),
    file_write_guid=st.binary(min_size=16, max_size=16),
    data_write_guid=st.binary(min_size=16, max_size=16),
    log_guid=st.binary(min_size=16, max_size=16),
    log_version=st.integers(0, 2**16 - 1),
    version=st.integers(0, 2**16 - 1),
    log_length=st.integers(0, 2**32 - 1),
    log_offset=st.integers(0, 2**64 - 1),
    checksum=st.just(0),
)
regions = st.lists(
    st.builds(
        vhdx.RegionEntry,
        guid=st.binary(min_size=16, max_size=16),
        file_offset=st.integers(0, 2**64 - 1),
        length=st.integers(0, 2**32 - 1),
        required=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda r: r.guid,
)


def test_crc32c_known_value() -> None:
    assert vhdx.crc32c(b"123456789") == 0xE3069283


@given(headers)
@settings(max_examples=50)
def test_header_round_trip(h: vhdx.Header) -> None:
    raw = vhdx.build_header(h)
    assert len(raw) == vhdx.VHDX_HEADER_SIZE
    back = vhdx.parse_header(raw, 65536)
    assert back == vhdx.Header(**{**h.__dict__, "checksum": back.checksum})
    assert back.checksum == int.from_bytes(raw[4:8], "little")


@given(regions)
@settings(max_examples=20)
def test_region_table_round_trip(entries: list[vhdx.RegionEntry]) -> None:
    raw = vhdx.build_region_table(entries)
    assert len(raw) == vhdx.VHDX_REGION_TABLE_SIZE
    assert vhdx.parse_region_table(raw, 0x30000) == tuple(entries)


@given(st.binary(max_size=4200), st.booleans())
@settings(max_examples=200)
def test_header_parse_or_raise(data: bytes, signature: bool) -> None:
    if signature:
        data = b"head" + data[4:]
    with contextlib.suppress(QcowlibError):
        vhdx.parse_header(data)


@given(st.binary(max_size=300), st.booleans(), st.integers(0, 2**32))
@settings(max_examples=200)
def test_tables_parse_or_raise(data: bytes, signature: bool, length: int) -> None:
    padded = (b"regi" + data[4:] if signature else data).ljust(vhdx.VHDX_REGION_TABLE_SIZE, b"\0")
    with contextlib.suppress(QcowlibError):
        vhdx.parse_region_table(padded)
    meta = b"metadata" + data if signature else data
    with contextlib.suppress(QcowlibError):
        vhdx.parse_metadata_table(meta, length)
    with contextlib.suppress(QcowlibError):
        vhdx.parse_file_identifier(data)


@given(st.binary(min_size=0, max_size=64), st.integers(0, 2**32))
@settings(max_examples=200)
def test_metadata_decode_or_raise(data: bytes, block_size: int) -> None:
    entries, items = vhdx.build_metadata_items(META)
    raw: dict[bytes, bytes] = {}
    pos = 0
    for e in entries:
        raw[e.item_id] = items[pos : pos + e.length]
        pos += e.length
    raw[vhdx.VHDX_FILE_PARAMETERS] = block_size.to_bytes(5, "little")[:4] + data[:4]
    raw[vhdx.VHDX_VIRTUAL_DISK_SIZE] = data[4:12]
    with contextlib.suppress(QcowlibError):
        vhdx.decode_metadata(entries, raw)


META = vhdx.Metadata(
    block_size=8 * MIB,
    leave_blocks_allocated=False,
    has_parent=False,
    virtual_disk_size=100 * MIB,
    logical_sector_size=512,
    physical_sector_size=4096,
    page83=bytes(range(16)),
)


def _decode(m: vhdx.Metadata) -> vhdx.Metadata:
    entries, items = vhdx.build_metadata_items(m)
    table = vhdx.build_metadata_table(entries)
    region = table + items
    parsed = vhdx.parse_metadata_table(table, MIB, 3 * MIB)
    assert parsed == entries
    return vhdx.decode_metadata(
        parsed, {e.item_id: region[e.offset : e.offset + e.length] for e in parsed}, 3 * MIB
    )


def test_metadata_round_trip() -> None:
    assert _decode(META) == META
    fixed = vhdx.Metadata(**{**META.__dict__, "leave_blocks_allocated": True})
    assert _decode(fixed) == fixed
    assert META.chunk_ratio == (1 << 23) * 512 // (8 * MIB) == 512


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"block_size": 3 * MIB}, CorruptImage, "block_size"),
        ({"block_size": 512 * MIB}, CorruptImage, "block_size"),
        ({"logical_sector_size": 1024}, CorruptImage, "logical_sector_size"),
        ({"logical_sector_size": 0}, CorruptImage, "logical_sector_size"),
        ({"physical_sector_size": 0}, CorruptImage, "physical_sector_size"),
        ({"virtual_disk_size": 65 << 40}, CorruptImage, "virtual_disk_size"),
        ({"virtual_disk_size": 1000}, CorruptImage, "virtual_disk_size"),
    ],
)
def test_metadata_refused(change: dict[str, int], error: type[QcowlibError], field: str) -> None:
    with pytest.raises(error) as exc:
        _decode(vhdx.Metadata(**{**META.__dict__, **change}))
    assert exc.value.field == field
    assert exc.value.offset is not None and exc.value.offset >= 3 * MIB + 65536


def test_metadata_unknown_required_and_missing() -> None:
    entries, _ = vhdx.build_metadata_items(META)
    unknown = vhdx.MetadataEntry(bytes(16), 65536 + 100, 8, is_required=True)
    with pytest.raises(UnsupportedFeature, match="unknown required metadata"):
        vhdx.decode_metadata((*entries, unknown), {})
    with pytest.raises(CorruptImage, match="missing or short"):
        vhdx.decode_metadata(entries[1:], {})


def test_header_errors_and_choice() -> None:
    raw = vhdx.build_header(HEADER)
    with pytest.raises(FormatError) as exc:
        vhdx.parse_header(b"XXXX" + raw[4:], 65536)
    assert exc.value.field == "signature" and exc.value.offset == 65536
    bad = bytearray(raw)
    bad[100] ^= 1
    with pytest.raises(CorruptImage) as exc:
        vhdx.parse_header(bytes(bad), 131072)
    assert exc.value.field == "checksum" and exc.value.offset == 131072 + 4
    with pytest.raises(TruncatedImage):
        vhdx.parse_header(raw[:100])

    def area(h1: bytes, h2: bytes) -> bytes:
        out = bytearray(vhdx.VHDX_HEADER_AREA)
        out[65536 : 65536 + 4096] = h1
        out[131072 : 131072 + 4096] = h2
        return bytes(out)

    newer = vhdx.build_header(vhdx.Header(**{**HEADER.__dict__, "sequence_number": 8}))
    assert vhdx.current_header(area(raw, newer))[1] == 131072
    assert vhdx.current_header(area(newer, raw))[1] == 65536
    # An invalid newer header is ignored: the older valid one is current.
    assert vhdx.current_header(area(raw, newer[:200] + b"x" + newer[201:]))[1] == 65536
    with pytest.raises(CorruptImage, match="no valid VHDX header"):
        vhdx.current_header(area(bytes(4096), bytes(4096)))
    other = vhdx.build_header(vhdx.Header(**{**HEADER.__dict__, "log_offset": 2 * MIB}))
    with pytest.raises(CorruptImage, match="same sequence number"):
        vhdx.current_header(area(raw, other))
    assert vhdx.current_header(area(raw, raw))[1] == 65536
    v2 = vhdx.build_header(vhdx.Header(**{**HEADER.__dict__, "version": 2}))
    with pytest.raises(UnsupportedFeature):
        vhdx.current_header(area(v2, bytes(4096)))
    with pytest.raises(TruncatedImage):
        vhdx.current_header(b"vhdxfile")
    assert vhdx.Header(**{**HEADER.__dict__, "log_guid": b"\1" * 16}).log_needs_replay
    assert not HEADER.log_needs_replay


def _regions(bat_at: int = 2 * MIB, meta_at: int = 3 * MIB) -> list[vhdx.RegionEntry]:
    return [
        vhdx.RegionEntry(vhdx.VHDX_BAT_GUID, bat_at, MIB, True),
        vhdx.RegionEntry(vhdx.VHDX_METADATA_GUID, meta_at, MIB, True),
    ]


def test_region_checks() -> None:
    bat, meta = vhdx.check_regions(_regions(), 8 * MIB)
    assert bat.file_offset == 2 * MIB and meta.file_offset == 3 * MIB
    with pytest.raises(TruncatedImage) as exc:
        vhdx.check_regions(_regions(bat_at=1 << 40), 8 * MIB, 0x30000)
    assert exc.value.field == "entry[0].file_offset" and exc.value.offset == 0x30000 + 32
    with pytest.raises(CorruptImage, match="aligned"):
        vhdx.check_regions(_regions(bat_at=2 * MIB + 512), 8 * MIB)
    with pytest.raises(CorruptImage, match="aligned"):
        vhdx.check_regions(_regions(bat_at=0), 8 * MIB)
    with pytest.raises(CorruptImage, match="overlap"):
        vhdx.check_regions(_regions(meta_at=2 * MIB), 8 * MIB)
    with pytest.raises(CorruptImage, match="no metadata region"):
        vhdx.check_regions(_regions()[:1], 8 * MIB)
    unknown = vhdx.RegionEntry(bytes(16), 4 * MIB, MIB, True)
    with pytest.raises(UnsupportedFeature, match="unknown required region"):
        vhdx.check_regions([*_regions(), unknown], 8 * MIB)
    optional = vhdx.RegionEntry(bytes(16), 4 * MIB, MIB, False)
    vhdx.check_regions([*_regions(), optional], 8 * MIB)


def test_region_table_errors() -> None:
    raw = bytearray(vhdx.build_region_table(_regions()))
    raw[8:12] = (5000).to_bytes(4, "little")
    raw[4:8] = bytes(4)
    with pytest.raises(CorruptImage, match="checksum"):
        vhdx.parse_region_table(bytes(raw))
    raw[4:8] = vhdx.crc32c(bytes(raw)).to_bytes(4, "little")
    with pytest.raises(CorruptImage, match="5000 entries"):
        vhdx.parse_region_table(bytes(raw))
    twice = vhdx.build_region_table([*_regions(), _regions()[0]])
    with pytest.raises(CorruptImage, match="twice"):
        vhdx.parse_region_table(twice)
    with pytest.raises(FormatError, match="regi"):
        vhdx.parse_region_table(bytes(vhdx.VHDX_REGION_TABLE_SIZE))


@pytest.mark.parametrize(
    ("size", "block", "ratio", "entries"),
    [
        (0, 8 * MIB, 512, 0),
        (MIB, 8 * MIB, 512, 1),
        (512 * 8 * MIB, 8 * MIB, 512, 512),
        (512 * 8 * MIB + 1, 8 * MIB, 512, 514),
        (64 << 40, 256 * MIB, 16, 262144 + 16383),
    ],
)
def test_bat_entries(size: int, block: int, ratio: int, entries: int) -> None:
    assert vhdx.chunk_ratio(block, 512) == ratio
    assert vhdx.bat_entries(size, block, ratio, has_parent=False) == entries


def test_bat_codec_interleave_and_check() -> None:
    m = vhdx.Metadata(**{**META.__dict__, "virtual_disk_size": 513 * 8 * MIB + 4096})
    n = vhdx.bat_entries(m.virtual_disk_size, m.block_size, m.chunk_ratio, has_parent=False)
    assert n == 514 + 1
    idx = vhdx.payload_bat_index(0, 514, 512)
    assert idx[511] == 511 and idx[512] == 513 and idx[513] == 514
    bat = np.zeros(n, dtype=np.uint64)
    bat[idx[0]] = np.uint64(8 * MIB | vhdx.PAYLOAD_BLOCK_FULLY_PRESENT)
    bat[idx[513]] = np.uint64(16 * MIB | vhdx.PAYLOAD_BLOCK_FULLY_PRESENT)
    bat[idx[1]] = np.uint64(vhdx.PAYLOAD_BLOCK_ZERO)
    raw = vhdx.encode_bat(bat)
    assert raw[:8] == (8 * MIB | 6).to_bytes(8, "little")
    back = vhdx.decode_bat(raw, n)
    assert (back == bat).all()
    assert list(vhdx.bat_states(back[:3])) == [6, 2, 0]
    assert int(vhdx.bat_offsets(back)[0]) == 8 * MIB
    # The last block's guest part is 4 KiB: a file ending there is complete.
    payload = vhdx.check_bat(back, m, 16 * MIB + 4096, 2 * MIB)
    assert payload.size == 514
    with pytest.raises(TruncatedImage) as exc:
        vhdx.check_bat(back, m, 16 * MIB + 4095, 2 * MIB)
    assert exc.value.field == "entry[514]" and exc.value.offset == 2 * MIB + 8 * 514
    bad = back.copy()
    bad[idx[2]] = np.uint64(7)
    with pytest.raises(CorruptImage, match="state 7"):
        vhdx.check_bat(bad, m, 1 << 40)
    bad[idx[2]] = np.uint64(MIB // 2 | 6)
    with pytest.raises(CorruptImage, match="header section"):
        vhdx.check_bat(bad, m, 1 << 40)
    with pytest.raises(TruncatedImage):
        vhdx.check_bat(back[:10], m, 1 << 40)
    with pytest.raises(TruncatedImage):
        vhdx.decode_bat(raw[:16], n)


def test_file_identifier() -> None:
    raw = vhdx.build_file_identifier("QEMU v7.2")
    assert len(raw) == 65536 and raw[:8] == b"vhdxfile"
    assert vhdx.parse_file_identifier(raw) == "QEMU v7.2"
    with pytest.raises(FormatError) as exc:
        vhdx.parse_file_identifier(b"vhdxfilX" + raw[8:])
    assert exc.value.structure == "vhdx file identifier"
