"""Tests for :mod:`qcowlib.formats.detect`: real images from qemu-img and crafted bytes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcowlib.formats import registry
from qcowlib.formats.detect import (
    FORMATS,
    PROBE_HEAD_SIZE,
    PROBE_TAIL_SIZE,
    QEMU_PROBE_BUF_SIZE,
    Probe,
    probe,
)

# --- helpers ----------------------------------------------------------------------------

_CREATE_ATTEMPTS = 20


@pytest.fixture(scope="module")
def qemu_img() -> str:
    """Path of qemu-img; skip without it, except under CI=true where that is a failure."""
    path = shutil.which("qemu-img")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-img is required under CI=true")
        pytest.skip("qemu-img not installed")
    return path


def probe_file(path: Path) -> Probe:
    """Probe a file the way a caller of :func:`probe` is meant to."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(PROBE_HEAD_SIZE)
        f.seek(max(0, size - PROBE_TAIL_SIZE))
        tail = f.read(PROBE_TAIL_SIZE)
    return probe(head, tail, size)


def probe_bytes(data: bytes) -> Probe:
    """Probe an in-memory file."""
    return probe(data[:PROBE_HEAD_SIZE], data[-PROBE_TAIL_SIZE:] if data else b"", len(data))


def qemu_format(qemu_img: str, path: Path) -> str:
    """The format qemu-img's own probe reports for ``path``."""
    done = subprocess.run(
        [qemu_img, "info", "--output=json", str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"qemu-img info failed: {done.stderr}"
    fmt = json.loads(done.stdout)["format"]
    assert isinstance(fmt, str)
    return fmt


def create(qemu_img: str, path: Path, fmt: str, *options: str, size: str = "16M") -> Path:
    """``qemu-img create -f fmt [options] path size``.

    For luks, qemu-img times PBKDF2 by thread CPU time and gives up with "Unable to get
    accurate CPU usage" when a fast machine runs its first round within one clock tick;
    that is retried.
    """
    for _ in range(_CREATE_ATTEMPTS):
        done = subprocess.run(
            [qemu_img, "create", "-q", "-f", fmt, *options, str(path), size],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode == 0 or "accurate CPU usage" not in done.stderr:
            break
    assert done.returncode == 0, f"qemu-img create failed: {done.stderr}"
    return path


def vhd_footer(current_size: int, disk_type: int = 2, *, checksum: int | None = None) -> bytes:
    """A VHD footer built from the specification (big-endian, 512 bytes)."""
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">II", footer, 8, 2, 0x00010000)  # features, file format version
    struct.pack_into(">Q", footer, 16, 0xFFFFFFFFFFFFFFFF)  # data offset: none (fixed)
    footer[28:32] = b"test"  # creator application
    struct.pack_into(">QQ", footer, 40, current_size, current_size)  # original, current
    struct.pack_into(">HBB", footer, 56, 16, 4, 17)  # geometry
    struct.pack_into(">I", footer, 60, disk_type)
    if checksum is None:
        checksum = ~sum(footer) & 0xFFFFFFFF  # checksum field is still zero here
    struct.pack_into(">I", footer, 64, checksum)
    return bytes(footer)


def iso_image(version: int = 1, size: int = 0x10000) -> bytes:
    """Zeros with an ISO 9660 primary volume descriptor at sector 16 (of 2048 bytes)."""
    data = bytearray(size)
    data[0x8000:0x8007] = b"\x01CD001" + bytes([version])
    data[0x8008:0x8010] = b"LINUX   "
    return bytes(data)


# --- the API ----------------------------------------------------------------------------


def test_constants() -> None:
    assert set(FORMATS) == set(registry.known())
    assert tuple(dict.fromkeys(name for name, _ in registry.probe_order())) == FORMATS
    assert FORMATS[-1] == "raw"  # the catch-all is asked last
    assert PROBE_HEAD_SIZE >= 0x8007  # ISO 9660 volume descriptor
    assert PROBE_HEAD_SIZE >= QEMU_PROBE_BUF_SIZE
    assert PROBE_TAIL_SIZE == 512


def test_probe_is_frozen_value() -> None:
    assert Probe("raw", None) == Probe("raw")
    p = Probe("vpc", "footer-only")
    with pytest.raises(AttributeError):
        p.format = "raw"  # type: ignore[misc]


# --- real images from qemu-img ------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "expected"),
    [
        ("qcow2", ("-o", "compat=0.10"), Probe("qcow2", None)),
        ("qcow2", ("-o", "compat=1.1"), Probe("qcow2", None)),
        ("vmdk", ("-o", "subformat=monolithicSparse"), Probe("vmdk", "monolithicSparse")),
        ("vmdk", ("-o", "subformat=streamOptimized"), Probe("vmdk", "streamOptimized")),
        ("vmdk", ("-o", "subformat=monolithicFlat"), Probe("vmdk", "descriptor")),
        ("vmdk", ("-o", "subformat=twoGbMaxExtentSparse"), Probe("vmdk", "descriptor")),
        ("vdi", ("-o", "static=on"), Probe("vdi", None)),
        ("vdi", ("-o", "static=off"), Probe("vdi", None)),
        ("vpc", ("-o", "subformat=dynamic"), Probe("vpc", None)),
        ("vhdx", (), Probe("vhdx", None)),
        ("qcow", (), Probe("qcow", None)),
        ("qed", (), Probe("qed", None)),
        ("qed", ("-o", "cluster_size=4k,table_size=2"), Probe("qed", None)),
        ("parallels", (), Probe("parallels", None)),
        ("parallels", ("-o", "cluster_size=64k"), Probe("parallels", None)),
        (
            "luks",
            ("--object", "secret,id=sec0,data=abc", "-o", "key-secret=sec0"),
            Probe("luks", None),
        ),
        ("raw", (), Probe("raw", None)),
    ],
    ids=lambda v: v if isinstance(v, str) else None if isinstance(v, Probe) else "-".join(v),
)
def test_qemu_img_images(
    qemu_img: str, tmp_path: Path, fmt: str, options: tuple[str, ...], expected: Probe
) -> None:
    path = create(qemu_img, tmp_path / f"image.{fmt}", fmt, *options)
    assert probe_file(path) == expected
    # qemu-img's own probe agrees on the format.
    assert qemu_format(qemu_img, path) == expected.format


@pytest.mark.parametrize(("compat", "version"), [("0.10", 2), ("1.1", 3)])
def test_qcow2_versions(qemu_img: str, tmp_path: Path, compat: str, version: int) -> None:
    path = create(qemu_img, tmp_path / "v.qcow2", "qcow2", "-o", f"compat={compat}")
    data = path.read_bytes()
    assert struct.unpack_from(">I", data, 4)[0] == version
    assert probe_bytes(data) == Probe("qcow2", None)


def test_vpc_fixed_found_by_footer(qemu_img: str, tmp_path: Path) -> None:
    path = create(qemu_img, tmp_path / "fixed.vhd", "vpc", "-o", "subformat=fixed", size="10M")
    size = path.stat().st_size
    data = path.read_bytes()
    assert data[:8] != b"conectix"  # only the footer says "VHD"
    assert data[-512:-504] == b"conectix"
    assert probe_file(path) == Probe("vpc", "footer-only")
    # Without the tail there is nothing to find.
    assert probe(data[:PROBE_HEAD_SIZE], b"", size) == Probe("raw")
    # qemu's probe does not look at the footer: a deliberate difference.
    assert qemu_format(qemu_img, path) == "raw"


def test_vpc_fixed_holding_luks_is_vpc(qemu_img: str, tmp_path: Path) -> None:
    """The data of a fixed VHD may begin with anything; the footer wins over luks."""
    path = create(qemu_img, tmp_path / "fixed.vhd", "vpc", "-o", "subformat=fixed", size="1M")
    data = bytearray(path.read_bytes())
    data[0:8] = b"LUKS\xba\xbe\x00\x01"
    assert probe_bytes(bytes(data)) == Probe("vpc", "footer-only")


def test_vpc_dynamic_has_footer_copy_at_start(qemu_img: str, tmp_path: Path) -> None:
    path = create(qemu_img, tmp_path / "dyn.vhd", "vpc", "-o", "subformat=dynamic")
    data = path.read_bytes()
    assert data[:8] == b"conectix"
    assert probe(data[:PROBE_HEAD_SIZE], b"", len(data)) == Probe("vpc", None)


def test_vmdk_extent_files(qemu_img: str, tmp_path: Path) -> None:
    """The descriptor is probed as such; its extents are what they are."""
    create(qemu_img, tmp_path / "flat.vmdk", "vmdk", "-o", "subformat=monolithicFlat")
    create(qemu_img, tmp_path / "split.vmdk", "vmdk", "-o", "subformat=twoGbMaxExtentSparse")
    assert probe_file(tmp_path / "flat.vmdk") == Probe("vmdk", "descriptor")
    assert probe_file(tmp_path / "flat-flat.vmdk") == Probe("raw")
    assert probe_file(tmp_path / "split.vmdk") == Probe("vmdk", "descriptor")
    assert probe_file(tmp_path / "split-s001.vmdk").format == "vmdk"


def test_vmdk_descriptor_head_must_start_with_comment_or_version(
    qemu_img: str, tmp_path: Path
) -> None:
    path = create(qemu_img, tmp_path / "flat.vmdk", "vmdk", "-o", "subformat=monolithicFlat")
    text = path.read_bytes()
    assert text.startswith(b"# Disk DescriptorFile\n")
    assert b'createType="monolithicFlat"' in text
    assert probe_bytes(text) == Probe("vmdk", "descriptor")
    assert probe_bytes(b"x" + text) == Probe("raw")


# --- crafted bytes ------------------------------------------------------------------


def test_empty_file_is_raw() -> None:
    assert probe(b"", b"", 0) == Probe("raw")


@pytest.mark.parametrize("size", [1, 4, 8, 511, 512, 513, 0x8007, 1 << 16, 1 << 20])
def test_all_zeros_is_raw(size: int) -> None:
    assert probe_bytes(bytes(size)) == Probe("raw")


def test_zero_size_is_raw_whatever_the_bytes() -> None:
    assert probe(b"QFI\xfb\x00\x00\x00\x03", b"", 0) == Probe("raw")


def test_qcow_magic_at_offset_4_is_raw() -> None:
    data = b"\0\0\0\0QFI\xfb\x00\x00\x00\x03" + bytes(1000)
    assert probe_bytes(data) == Probe("raw")


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (0, Probe("raw")),  # magic alone: no QEMU driver claims it
        (1, Probe("qcow")),  # legacy QCOW: QEMU's qcow driver
        (2, Probe("qcow2")),
        (3, Probe("qcow2")),
        (4, Probe("qcow2", "unsupported-version")),
        (0xFFFFFFFF, Probe("qcow2", "unsupported-version")),
    ],
)
def test_qcow2_version_rule(version: int, expected: Probe) -> None:
    data = b"QFI\xfb" + struct.pack(">I", version) + bytes(504)
    assert probe_bytes(data) == expected


def test_short_files_are_probed_as_qemu_pads_them() -> None:
    # QEMU 7.2 hands its probes 2048 bytes, zero-filled past the end of the file.
    assert probe_bytes(b"QFI\xfb\x00\x00\x00\x01") == Probe("qcow")
    assert probe_bytes(b"QED\0") == Probe("qed")
    assert probe_bytes(b"WithoutFreeSpace\x02") == Probe("parallels")
    assert probe_bytes(b"WithoutFreeSpace") == Probe("raw")  # version 0


@pytest.mark.parametrize("magic", [b"WithoutFreeSpace", b"WithouFreSpacExt"])
def test_parallels_magics_and_version(magic: bytes) -> None:
    head = magic + struct.pack("<I", 2) + bytes(44)
    assert probe_bytes(head) == Probe("parallels")
    assert probe_bytes(magic + struct.pack("<I", 1) + bytes(44)) == Probe("raw")
    assert probe_bytes(b"\0" + magic + struct.pack("<I", 2)) == Probe("raw")


def test_qed_magic() -> None:
    assert probe_bytes(b"QED\0" + bytes(60)) == Probe("qed")
    assert probe_bytes(b"QEd\0" + bytes(60)) == Probe("raw")


@pytest.mark.parametrize(
    ("fmt", "head"),
    [
        ("qcow", b"QFI\xfb\x00\x00\x00\x01"),
        ("qed", b"QED\0"),
        ("parallels", b"WithouFreSpacExt\x02\x00"),
    ],
)
def test_short_files_agree_with_qemu_img(
    qemu_img: str, tmp_path: Path, fmt: str, head: bytes
) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(head)
    assert probe_file(path) == Probe(fmt)
    out = subprocess.run([qemu_img, "info", str(path)], check=False, capture_output=True, text=True)
    assert f"Could not open '{path}'" in out.stderr  # qemu-img probed it as {fmt} too


def test_qcow2_magic_without_version_is_raw() -> None:
    assert probe_bytes(b"QFI\xfb") == Probe("raw")
    assert probe_bytes(b"QFI\xfb\x00\x00\x00") == Probe("raw")


@pytest.mark.parametrize(
    ("version", "expected"),
    [(0, "raw"), (1, "luks"), (2, "luks"), (3, "raw"), (0x0100, "raw")],
)
def test_luks_version_rule(version: int, expected: str) -> None:
    data = b"LUKS\xba\xbe" + struct.pack(">H", version) + bytes(4096)
    assert probe_bytes(data) == Probe(expected)


def test_luks_magic_alone_is_raw() -> None:
    assert probe_bytes(b"LUKS\xba\xbe") == Probe("raw")


def test_iso9660() -> None:
    assert probe_bytes(iso_image()) == Probe("iso")
    # Head cut to exactly what is needed.
    assert probe(iso_image()[:0x8007], b"", 1 << 30) == Probe("iso")


@pytest.mark.parametrize(
    "data",
    [
        iso_image(version=2),
        iso_image()[:0x8006],  # the descriptor version byte is not there
        bytes(0x8001) + b"CD001" + bytes(100),  # identifier without type/version
    ],
    ids=["version-2", "truncated", "no-version"],
)
def test_iso9660_needs_the_version_byte(data: bytes) -> None:
    assert probe_bytes(data) == Probe("raw")


def test_iso_inside_a_qcow2_header_is_qcow2() -> None:
    data = bytearray(iso_image())
    data[0:8] = b"QFI\xfb\x00\x00\x00\x03"
    assert probe_bytes(bytes(data)) == Probe("qcow2")


def test_vdi_signature() -> None:
    data = bytearray(512)
    data[0:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    data[0x40:0x44] = struct.pack("<I", 0xBEDA107F)
    assert probe_bytes(bytes(data)) == Probe("vdi")
    data[0x40:0x44] = struct.pack(">I", 0xBEDA107F)  # wrong byte order
    assert probe_bytes(bytes(data)) == Probe("raw")


def test_vhdx_signature() -> None:
    assert probe_bytes(b"vhdxfile" + bytes(1 << 16)) == Probe("vhdx")
    assert probe_bytes(b"vhdxfil") == Probe("raw")


@pytest.mark.parametrize("magic", [b"KDMV", b"COWD"])
def test_vmdk_binary_magics(magic: bytes) -> None:
    assert probe_bytes(magic + bytes(508)).format == "vmdk"


def test_vmdk_embedded_descriptor_outside_head() -> None:
    header = bytearray(512)
    header[0:4] = b"KDMV"
    struct.pack_into("<IIQQQQ", header, 4, 1, 3, 2048, 128, 1 << 20, 20)
    assert probe_bytes(bytes(header)) == Probe("vmdk", None)


def test_vmdk_embedded_descriptor_create_type() -> None:
    header = bytearray(512 * 22)
    header[0:4] = b"KDMV"
    struct.pack_into("<IIQQQQ", header, 4, 1, 3, 2048, 128, 1, 20)
    desc = b'# Disk DescriptorFile\nversion=1\nCID=1\ncreateType="monolithicSparse"\n'
    header[512 : 512 + len(desc)] = desc
    assert probe_bytes(bytes(header)) == Probe("vmdk", "monolithicSparse")


@pytest.mark.parametrize(
    "text",
    [
        b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n',
        b"# Disk DescriptorFile\r\nversion=1\r\n",
        b"version=2\n",
        b"version=3\r\n",
        b"# a\n# b\n   \n  \r\nversion=1\n",
    ],
)
def test_vmdk_descriptor_accepted(text: bytes) -> None:
    assert probe_bytes(text) == Probe("vmdk", "descriptor")


@pytest.mark.parametrize(
    "text",
    [
        b"# Disk DescriptorFile\n",
        b"# Disk DescriptorFile\nversion=4\n",
        b"# Disk DescriptorFile\nversion=1",  # no line end
        b"# Disk DescriptorFile\n\nversion=1\n",  # an empty line: qemu says raw too
        b"  x\nversion=1\n",
        b'createType="monolithicFlat"\nversion=1\n',
        b"# Disk DescriptorFile",
        b"   ",
    ],
)
def test_vmdk_descriptor_rejected(text: bytes) -> None:
    assert probe_bytes(text) == Probe("raw")


def test_vmdk_descriptor_only_in_qemu_probe_window() -> None:
    comment = b"#" + b"x" * (QEMU_PROBE_BUF_SIZE - 2) + b"\n"
    assert probe_bytes(comment[:-11] + b"\nversion=1\n") == Probe("vmdk", "descriptor")
    assert probe_bytes(comment + b"version=1\n") == Probe("raw")


def test_vhd_footer_crafted() -> None:
    data = bytes(4096) + vhd_footer(4096)
    assert probe_bytes(data) == Probe("vpc", "footer-only")


def test_vhd_footer_small_file_head_and_tail_overlap() -> None:
    data = bytes(512) + vhd_footer(512)
    assert probe(data, data[-512:], len(data)) == Probe("vpc", "footer-only")
    assert probe(data, data, len(data)) == Probe("vpc", "footer-only")


@pytest.mark.parametrize(
    ("footer", "data_size"),
    [
        (vhd_footer(4096, checksum=0), 4096),  # bad checksum
        (vhd_footer(4096, disk_type=3), 4096),  # dynamic disks have a header at 0
        (vhd_footer(4096, disk_type=4), 4096),  # differencing likewise
        (vhd_footer(8192), 4096),  # current size larger than the data
        (b"conectiy" + vhd_footer(4096)[8:], 4096),  # wrong cookie
    ],
    ids=["checksum", "dynamic", "differencing", "too-large", "cookie"],
)
def test_vhd_footer_rejected(footer: bytes, data_size: int) -> None:
    assert probe_bytes(bytes(data_size) + footer) == Probe("raw")


def test_vhd_footer_needs_512_bytes() -> None:
    footer = vhd_footer(0)
    assert probe(footer, footer, 512) == Probe("vpc", "footer-only")
    assert probe(footer[1:], footer[1:], 511) == Probe("raw")


def test_oversized_buffers_are_cut() -> None:
    data = bytes(PROBE_HEAD_SIZE) + iso_image()
    assert probe(data, data, len(data)) == Probe("raw")


# --- never raises -----------------------------------------------------------------


@given(st.binary(), st.binary(), st.integers(0, 2**63))
def test_probe_never_raises(head: bytes, tail: bytes, file_size: int) -> None:
    result = probe(head, tail, file_size)
    assert result.format in FORMATS


_MAGICS = [
    b"QFI\xfb",
    b"KDMV",
    b"COWD",
    b"vhdxfile",
    b"conectix",
    b"LUKS\xba\xbe",
    b"# Disk DescriptorFile\n",
    b"version=1\n",
    b" ",
    b"#",
]


@given(
    st.sampled_from(_MAGICS),
    st.binary(max_size=2048),
    st.one_of(
        st.just(b""), st.binary(max_size=600), st.builds(vhd_footer, st.integers(0, 1 << 16))
    ),
    st.integers(-5, 1 << 20),
)
def test_probe_never_raises_near_magics(
    magic: bytes, rest: bytes, tail: bytes, file_size: int
) -> None:
    result = probe(magic + rest, tail, file_size)
    assert result.format in FORMATS
    assert result.detail is None or isinstance(result.detail, str)
