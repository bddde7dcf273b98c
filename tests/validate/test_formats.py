"""The pure structure parsers of :mod:`qcowlib.validate.formats`, and "parse, or raise
QcowlibError" for arbitrary bytes, in every parser validate reads headers with (its own
and the format codecs'), down to whole validations of random files."""

from __future__ import annotations

import contextlib
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.errors import QcowlibError
from qcowlib.formats.vdi import codec as vdi
from qcowlib.formats.vhd import codec as vhd
from qcowlib.formats.vhdx import codec as vhdx
from qcowlib.formats.vmdk import codec as vmdk
from qcowlib.validate import formats as fm
from qcowlib.validate import validate
from tests.validate.images import write_descriptor, write_gpt_disk, write_iso, write_mbr_disk


def test_mbr_checks() -> None:
    def problems(entries: list[tuple[int, int, bytes, int]]) -> list[str]:
        sector = bytearray(512)
        for i, (boot, os_type, chs, start) in enumerate(entries):
            struct.pack_into(
                "<B3sB3sII", sector, 446 + 16 * i, boot, chs, os_type, b"\0\0\0", start, 9
            )
        sector[510:] = b"\x55\xaa"
        return [p.message for p in fm.mbr_problems(fm.parse_mbr(bytes(sector)))]

    assert problems([(0x80, 0x83, b"\1\1\0", 63)]) == []
    assert problems([]) == ["MBR defines no partitions"]
    assert problems([(0x01, 0x83, b"\1\1\0", 63)]) == ["MBR partition 0 has an invalid boot flag"]
    assert problems([(0, 0xEE, b"\0\2\0", 1)]) == []
    assert "protective MBR does not start at LBA 1" in problems([(0, 0xEE, b"\0\2\0", 2)])
    assert "protective MBR has an invalid start CHS" in problems([(0, 0xEE, b"\0\1\0", 1)])
    extra = problems([(0, 0xEE, b"\0\2\0", 1), (0, 0x83, b"\0\2\0", 100)])
    assert extra == ["protective MBR defines partitions besides the GPT one"]


def test_gpt_header(tmp_path: Path) -> None:
    disk = write_gpt_disk(tmp_path / "gpt.raw").read_bytes()
    h = fm.parse_gpt_header(disk[512:1024], 512, len(disk))
    assert not h.problems and h.num_partition_entries == 128
    broken = bytearray(disk[512:1024])
    broken[24] = 7  # my_lba, and so the CRC
    messages = [p.message for p in fm.parse_gpt_header(bytes(broken), 512, len(disk)).problems]
    assert "GPT header CRC32 is wrong" in messages
    assert any("LBA 7" in m for m in messages)


def test_iso_descriptors(tmp_path: Path) -> None:
    data = write_iso(tmp_path / "x.iso").read_bytes()
    vol = fm.parse_iso_descriptors(data[0x8000:], len(data))
    assert vol.volume_size == len(data) and not vol.problems
    short = fm.parse_iso_descriptors(data[0x8000:], len(data) // 2)
    assert any("but the file has only" in p.message for p in short.problems)
    with pytest.raises(QcowlibError):
        fm.parse_iso_descriptors(b"\0" * 4096, 40000)


def test_inspector_view(tmp_path: Path) -> None:
    mbr = write_mbr_disk(tmp_path / "m.raw").read_bytes()
    assert fm.inspector_view(mbr[:65536], len(mbr)) == fm.InspectorView(("gpt",), "gpt")
    iso = write_iso(tmp_path / "h.iso", with_mbr=True).read_bytes()
    assert fm.inspector_view(iso, len(iso)).format == "iso"
    poly = b"QFI\xfb" + bytes(506) + b"\x55\xaa"
    assert fm.inspector_view(poly, len(poly)) == fm.InspectorView(("qcow2", "gpt"), None)
    assert fm.inspector_view(b"QFI\xfb" + bytes(100), 104).format == "raw"  # < 512 bytes
    fat = bytearray(mbr[:512])
    fat[0x10], fat[0x15] = 2, 0xF8
    assert fm.inspector_view(bytes(fat), 512).format == "raw"
    desc = write_descriptor(tmp_path / "d.vmdk", "monolithicSparse", ['RW 1 SPARSE "a"'])
    text = desc.read_bytes()
    assert fm.inspector_view(text, len(text)).format == "vmdk"
    assert fm.inspector_view(b"LUKS\xba\xbe\0\1" + bytes(600), 608).format == "luks"


def _vhdx_area(blob: bytes) -> object:
    vhdx.parse_file_identifier(blob)
    return vhdx.current_header(blob.ljust(vhdx.VHDX_HEADER_AREA, b"\0"))


PARSERS: list[tuple[str, Callable[[bytes], Any]]] = [
    ("qcow2", fm.qcow2_fields),
    ("vmdk-header", lambda b: vmdk.header_problems(vmdk.decode_header(b), len(b))),
    ("vmdk-footer", lambda b: vmdk.stream_footer_header(b, len(b))),
    ("vmdk-descriptor", lambda b: vmdk.descriptor_problems(vmdk.parse_descriptor(b))),
    ("vhd-footer", lambda b: vhd.locate_footer(b[:512], b[-512:], len(b))),
    ("vhd-dynamic", vhd.parse_dynamic_header),
    ("vhdx", _vhdx_area),
    ("vhdx-regions", lambda b: vhdx.region_problems(vhdx.parse_region_table(b), len(b))),
    ("vhdx-metadata", lambda b: vhdx.parse_metadata_table(b, 1 << 20)),
    ("vhdx-locator", vhdx.parse_parent_locator),
    ("vdi", lambda b: vdi.header_problems(vdi.decode_header(b), len(b))),
    ("luks", lambda b: fm.parse_luks_header(b, len(b))),
    ("mbr", lambda b: fm.mbr_problems(fm.parse_mbr(b))),
    ("gpt", lambda b: fm.parse_gpt_header(b, 512, 1 << 20)),
    ("iso", lambda b: fm.parse_iso_descriptors(b, len(b))),
    ("inspector", lambda b: fm.inspector_view(b, len(b))),
]
MAGICS = [
    b"",
    b"QFI\xfb\0\0\0\x03",
    b"QFI\xfb\0\0\0\x02",
    b"KDMV\x01\0\0\0",
    b"COWD",
    b"conectix",
    b"vhdxfile",
    b"LUKS\xba\xbe\0\x01",
    b"metadata",
    b"EFI PART",
    b"\x01CD001\x01",
    b"cxsparse",
    b"regi",
    bytes(64) + struct.pack("<II", vdi.VDI_SIGNATURE, vdi.VDI_VERSION_1_1),
    b'version=1\ncreateType="monolithicSparse"\nRW 1 FLAT "x" 0\n',
]
blobs = st.builds(lambda m, rest: m + rest, st.sampled_from(MAGICS), st.binary(max_size=2048))


@settings(max_examples=300, deadline=None)
@given(blob=blobs)
def test_parsers_parse_or_raise_qcowlib_error(blob: bytes) -> None:
    for _, parse in PARSERS:
        with contextlib.suppress(QcowlibError):
            parse(blob)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=blobs, pad=st.sampled_from([0, 512, 40000, 70000]), tail=st.binary(max_size=600))
def test_validate_random_files(blob: bytes, pad: int, tail: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.img"
        path.write_bytes(blob + bytes(pad) + tail)
        for policy in ("glance", "strict"):
            report = validate(path, policy=policy, disk_format=None)
            for f in report.findings:
                assert " failed while checking" not in f.message, f
