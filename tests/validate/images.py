"""The images the validation tests run on: made with qemu-img where it can make them
(as oslo.utils' own format inspector tests do), written byte by byte where it cannot
(MBR, GPT, ISO 9660, crafted VMDK descriptors, poked qcow2 headers).

One table, :data:`CASES`, drives the rule tests and the differential test against
oslo.utils' inspector: each case names its builder, the disk_format it is declared as,
whether the ``glance`` policy accepts it, and the rule ids expected to report errors.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import qemu_img

SECTOR = 512


def qemu_io(*args: str | Path) -> None:
    subprocess.run(["qemu-io", *map(str, args)], check=True, capture_output=True, text=True)


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def or_byte(path: Path, offset: int, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value | bits]))


def create(path: Path, fmt: str, size: str = "1M", *opts: str) -> Path:
    args: list[str | Path] = ["create", "-q", "-f", fmt]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, path, size)
    return path


def create_luks(path: Path) -> Path:
    """qemu-img's luks driver sometimes fails with a transient "Unable to get accurate
    CPU usage" while timing its PBKDF; retry a few times as oslo's tests do."""
    last = None
    for attempt in range(20):
        res = qemu_img(
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "key-secret=sec0,iter-time=10",
            path,
            "16M",
            check=False,
        )
        if res.returncode == 0:
            return path
        last = res.stderr
        time.sleep(0.05 * (attempt + 1))
    raise RuntimeError(f"qemu-img create -f luks kept failing: {last}")


# ---------------------------------------------------------------------------------------
# builders that write bytes


def _mbr(entries: list[bytes], boot_code: bytes = b"") -> bytes:
    sector = bytearray(SECTOR)
    sector[: len(boot_code)] = boot_code
    for i, e in enumerate(entries):
        sector[446 + 16 * i : 446 + 16 * (i + 1)] = e
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _pte(boot: int, os_type: int, start: int, size: int, chs: bytes = b"\x00\x02\x00") -> bytes:
    return struct.pack("<B3sB3sII", boot, chs, os_type, b"\xff\xff\xff", start, size)


def write_mbr_disk(path: Path, boot: int = 0x80, os_type: int = 0x83) -> Path:
    size = 1 << 20
    entries = [_pte(boot, os_type, 63, size // SECTOR - 63, b"\x01\x01\x00")] if os_type else []
    with open(path, "wb") as f:
        f.write(_mbr(entries))
        f.truncate(size)
    return path


def write_gpt_disk(path: Path) -> Path:
    """A 1 MiB disk with a protective MBR, primary and backup GPT and one partition."""
    size = 1 << 20
    lbas = size // SECTOR
    last = lbas - 1
    entry = bytearray(128)
    entry[0:16] = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4").bytes_le
    entry[16:32] = uuid.uuid4().bytes_le
    struct.pack_into("<QQ", entry, 32, 34, last - 33)
    entry[56 : 56 + 8] = "root".encode("utf-16-le")
    entries = bytes(entry) + bytes(127 * 128)
    entries_crc = zlib.crc32(entries)

    def header(my_lba: int, alt_lba: int, entries_lba: int) -> bytes:
        h = bytearray(
            struct.pack(
                "<8sIIIIQQQQ16sQIII",
                b"EFI PART",
                0x00010000,
                92,
                0,
                0,
                my_lba,
                alt_lba,
                34,
                last - 33,
                uuid.uuid4().bytes_le,
                entries_lba,
                128,
                128,
                entries_crc,
            )
        )
        struct.pack_into("<I", h, 16, zlib.crc32(bytes(h)))
        return bytes(h).ljust(SECTOR, b"\0")

    mbr = _mbr([_pte(0, 0xEE, 1, min(lbas - 1, 0xFFFFFFFF))])
    with open(path, "wb") as f:
        f.write(mbr)
        f.write(header(1, last, 2))
        f.write(entries)
        f.seek((last - 32) * SECTOR)
        f.write(entries)
        f.write(header(last, 1, last - 32))
    assert os.path.getsize(path) == size
    return path


def write_iso(path: Path, with_mbr: bool = False) -> Path:
    """A 64 KiB ISO 9660 image: system area, primary volume descriptor, terminator."""
    size = 64 * 1024
    data = bytearray(size)
    if with_mbr:
        data[:SECTOR] = _mbr([_pte(0x80, 0x17, 0, size // SECTOR, b"\x00\x01\x00")])
    pvd = bytearray(2048)
    pvd[0] = 1
    pvd[1:6] = b"CD001"
    pvd[6] = 1
    pvd[40:72] = b"QCOWLIB TEST".ljust(32)
    blocks = size // 2048
    struct.pack_into("<I", pvd, 80, blocks)
    struct.pack_into(">I", pvd, 84, blocks)
    struct.pack_into("<H", pvd, 128, 2048)
    struct.pack_into(">H", pvd, 130, 2048)
    data[0x8000 : 0x8000 + 2048] = pvd
    term = bytearray(2048)
    term[0] = 255
    term[1:6] = b"CD001"
    term[6] = 1
    data[0x8800 : 0x8800 + 2048] = term
    path.write_bytes(bytes(data))
    return path


def write_descriptor(path: Path, create_type: str, extents: list[str], extra: str = "") -> Path:
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        "CID=fffffffe",
        "parentCID=ffffffff",
        f'createType="{create_type}"',
        extra,
        "",
        "# Extent description",
        *extents,
        "",
        "# The Disk Data Base",
        "#DDB",
        'ddb.virtualHWVersion = "4"',
        'ddb.adapterType = "ide"',
    ]
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    disk_format: str
    accepted: bool
    #: Rule ids expected among the errors (glance policy).
    errors: tuple[str, ...] = ()
    #: Rule ids expected among the warnings (glance policy).
    warnings: tuple[str, ...] = ()
    #: Detected format expected in the report.
    format: str | None = None
    #: Why qcowlib refuses what Glance accepts ("" when both agree).
    stricter: str = ""
    #: Words the first error message must contain.
    says: tuple[str, ...] = field(default=())


def _qcow2(*opts: str) -> Callable[[Path], Path]:
    return lambda d: create(d / "img.qcow2", "qcow2", "1M", *opts)


def _qcow2_with_data(d: Path) -> Path:
    p = create(d / "data.qcow2", "qcow2", "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -z 2M 64k", p)
    return p


def _backing(d: Path) -> Path:
    create(d / "base.qcow2", "qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
    return d / "top.qcow2"


def _data_file(d: Path) -> Path:
    # qemu-img creates the data file relative to its working directory: run it in d.
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=ext-data.raw",
            "ext.qcow2",
            "1M",
        ],
        cwd=d,
        check=True,
        capture_output=True,
    )
    assert (d / "ext-data.raw").exists()
    return d / "ext.qcow2"


def _poked(bits: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = create(d / "poked.qcow2", "qcow2", "1M")
        or_byte(p, 79, bits)
        return p

    return build


def _truncated(d: Path) -> Path:
    p = _qcow2_with_data(d)
    with open(p, "r+b") as f:
        f.truncate(1024)
    return p


def _qcow2_garbage_header(d: Path) -> Path:
    p = d / "bad.qcow2"
    p.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(range(256)) * 16)
    return p


def _qcow1(d: Path) -> Path:
    p = d / "old.qcow"
    p.write_bytes(b"QFI\xfb\x00\x00\x00\x01" + bytes(1016))
    return p


def _polyglot(d: Path) -> Path:
    p = create(d / "poly.qcow2", "qcow2", "1M")
    poke(p, 510, b"\x55\xaa")
    return p


def _vmdk(subformat: str) -> Callable[[Path], Path]:
    return lambda d: create(d / f"{subformat}.vmdk", "vmdk", "1M", f"subformat={subformat}")


def _vmdk_child(d: Path) -> Path:
    create(d / "parent.vmdk", "vmdk", "1M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk", d / "child.vmdk")
    return d / "child.vmdk"


def _vmdk_capacity0(d: Path) -> Path:
    p = create(d / "cap0.vmdk", "vmdk", "1M", "subformat=monolithicSparse")
    poke(p, 12, bytes(8))
    return p


def _vmdk_stream_footer(d: Path, bad_eos: bool = False) -> Path:
    """A streamOptimized VMDK whose header defers to a footer (gdOffset = GD_AT_END),
    as VMware's stream writers make them: footer marker, footer, end-of-stream marker.
    qemu-img 7.2 writes the grain directory offset in the header instead."""
    p = create(d / "stream.vmdk", "vmdk", "1M", "subformat=streamOptimized")
    footer = p.read_bytes()[:SECTOR]
    poke(p, 56, b"\xff" * 8)
    marker = struct.pack("<QII", 1, 0, 3).ljust(SECTOR, b"\0")
    eos = struct.pack("<QII", 0, 0, 7 if bad_eos else 0).ljust(SECTOR, b"\0")
    with open(p, "ab") as f:
        f.write(marker + footer + eos)
    return p


def _vhd(subformat: str) -> Callable[[Path], Path]:
    return lambda d: create(d / f"{subformat}.vhd", "vpc", "10M", f"subformat={subformat}")


def _vhd_checksum(block: bytes, at: int) -> bytes:
    total = sum(block[:at]) + sum(block[at + 4 :])
    return struct.pack(">I", ~total & 0xFFFFFFFF)


def _vhd_differencing(d: Path) -> Path:
    """A dynamic VHD turned into a differencing one naming a parent (qemu-img cannot
    create those)."""
    p = create(d / "diff.vhd", "vpc", "10M", "subformat=dynamic")
    data = bytearray(p.read_bytes())
    for at in (0, len(data) - SECTOR):
        footer = data[at : at + SECTOR]
        footer[60:64] = struct.pack(">I", 4)
        footer[64:68] = _vhd_checksum(bytes(footer[:SECTOR]), 64)
        data[at : at + SECTOR] = footer
    dyn_at = struct.unpack_from(">Q", data, 16)[0]
    dyn = data[dyn_at : dyn_at + 1024]
    name = "parent.vhd".encode("utf-16-be")
    dyn[64 : 64 + len(name)] = name
    dyn[36:40] = _vhd_checksum(bytes(dyn), 36)
    data[dyn_at : dyn_at + 1024] = dyn
    p.write_bytes(bytes(data))
    return p


def _vhd_bad_dynamic_header(d: Path) -> Path:
    p = create(d / "baddyn.vhd", "vpc", "10M", "subformat=dynamic")
    dyn_at = struct.unpack_from(">Q", p.read_bytes(), 16)[0]
    poke(p, dyn_at, b"xxsparse")
    return p


def _vhdx_metadata_item(data: bytes, guid: str) -> int:
    """File offset of a VHDX metadata item, found through the region table."""
    meta_region = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    count = struct.unpack_from("<I", data, 192 * 1024 + 8)[0]
    for i in range(count):
        at = 192 * 1024 + 16 + 32 * i
        if data[at : at + 16] == meta_region:
            base = struct.unpack_from("<Q", data, at + 16)[0]
            break
    else:
        raise AssertionError("no metadata region")
    entries = struct.unpack_from("<H", data, base + 10)[0]
    want = uuid.UUID(guid).bytes_le
    for i in range(entries):
        at = base + 32 + 32 * i
        if data[at : at + 16] == want:
            return int(base + struct.unpack_from("<I", data, at + 16)[0])
    raise AssertionError("no such metadata item")


def _vhdx_has_parent(d: Path) -> Path:
    p = create(d / "child.vhdx", "vhdx", "10M")
    at = _vhdx_metadata_item(p.read_bytes(), "CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
    or_byte(p, at + 4, 0x02)  # file parameters: HasParent
    return p


def _vhdx_no_valid_header(d: Path) -> Path:
    p = create(d / "nohead.vhdx", "vhdx", "10M")
    # Flip a checksum byte of both headers (writing a fixed value could leave it as it was).
    data = p.read_bytes()
    for at in (64 * 1024 + 8, 128 * 1024 + 8):
        poke(p, at, bytes([data[at] ^ 0xFF]))
    return p


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: independent of the codec under test."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _vhdx_unreplayed_log(d: Path) -> Path:
    """A VHDX whose log holds a valid entry named by its headers (as after a crash
    mid-update): QEMU refuses to open it read-only."""
    from tests.formats.vhdx_log_builder import Data, entry, make_dirty

    p = create(d / "log.vhdx", "vhdx", "10M")
    make_dirty(p, [(0, entry(3, [Data(4 << 20, bytes(4096))], flushed=0, last=0))])
    return p


def _vhd_bad_footer_checksum(d: Path) -> Path:
    """A dynamic VHD whose footer copy at offset 0 (the one QEMU reads) has a wrong checksum."""
    p = create(d / "badsum.vhd", "vpc", "10M", "subformat=dynamic")
    checksum = struct.unpack_from(">I", p.read_bytes(), 64)[0]
    poke(p, 64, struct.pack(">I", checksum ^ 0x00010000))
    return p


def _vmdk_gd_past_eof(d: Path) -> Path:
    """A sparse VMDK whose grain directory starts in the last sector but ends past the end
    of the file (64 GiB: 2048 directory entries, 8 KiB)."""
    p = create(d / "gd.vmdk", "vmdk", "64G", "subformat=monolithicSparse")
    last_sector = p.stat().st_size // SECTOR - 1
    poke(p, 56, struct.pack("<Q", last_sector))  # gd_offset
    return p


def _vdi_poked(offset: int, data: bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = create(d / "poked.vdi", "vdi", "10M")
        poke(p, offset, data)
        return p

    return build


def _iso_truncated(d: Path) -> Path:
    p = write_iso(d / "cut.iso")
    with open(p, "r+b") as f:
        f.truncate(40 * 1024)
    return p


def _vmdk_poked(offset_of: Callable[[bytes], int], data: bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = create(d / "poked.vmdk", "vmdk", "1M", "subformat=monolithicSparse")
        poke(p, offset_of(p.read_bytes()), data)
        return p

    return build


def _garbage(d: Path) -> Path:
    p = d / "garbage.bin"
    p.write_bytes(os.urandom(3000).replace(b"QFI", b"XXX"))
    return p


def _luks2(d: Path) -> Path:
    p = d / "v2.luks"
    p.write_bytes(b"LUKS\xba\xbe\x00\x02" + bytes(4088))
    return p


def _passwd_descriptor(create_type: str) -> Callable[[Path], Path]:
    return lambda d: write_descriptor(d / "passwd.vmdk", create_type, ['RW 8 FLAT "/etc/passwd" 0'])


CASES: tuple[Case, ...] = (
    Case("qcow2-v3", _qcow2(), "qcow2", True, format="qcow2"),
    Case("qcow2-v2", _qcow2("compat=0.10"), "qcow2", True, format="qcow2"),
    Case("qcow2-data", _qcow2_with_data, "qcow2", True),
    Case("qcow2-zstd", _qcow2("compression_type=zstd"), "qcow2", True),
    Case(
        "qcow2-backing",
        _backing,
        "qcow2",
        False,
        ("backing-file",),
        says=("base.qcow2", "qcowlib flatten"),
    ),
    Case(
        "qcow2-backing-as-raw",
        _backing,
        "raw",
        False,
        ("backing-file", "format-match"),
    ),
    Case("qcow2-data-file", _data_file, "qcow2", False, ("data-file",), says=("ext-data.raw",)),
    Case("qcow2-extended-l2", _qcow2("extended_l2=on"), "qcow2", False, ("unknown-features",)),
    Case("qcow2-unknown-bit", _poked(0x20), "qcow2", False, ("unknown-features",)),
    Case("qcow2-dirty", _poked(0x01), "qcow2", True, warnings=("dirty",)),
    Case(
        "qcow2-corrupt",
        _poked(0x02),
        "qcow2",
        False,
        ("corrupt",),
        stricter="Glance does not look at the corrupt bit",
    ),
    Case(
        "qcow2-huge",
        lambda d: create(d / "huge.qcow2", "qcow2", "2T"),
        "qcow2",
        False,
        ("virtual-size",),
        stricter="Glance caps uploaded bytes, not the virtual size",
    ),
    Case(
        "qcow2-truncated",
        _truncated,
        "qcow2",
        False,
        ("structure",),
        stricter="Glance's inspector reads only the first 512 bytes of a qcow2",
    ),
    Case(
        "qcow2-garbage-header",
        _qcow2_garbage_header,
        "qcow2",
        False,
        ("structure",),
    ),
    Case("qcow1", _qcow1, "qcow2", False, ("banned-format",)),
    Case("qcow2-mbr-polyglot", _polyglot, "qcow2", False, ("format-ambiguous",)),
    Case(
        "qcow2-as-raw",
        _qcow2(),
        "raw",
        False,
        ("format-match",),
        says=("no VM would boot", "--disk-format qcow2"),
        stricter="Glance stores a qcow2 declared raw; no VM boots from it as intended",
    ),
    Case(
        "raw-as-qcow2", lambda d: write_mbr_disk(d / "disk.raw"), "qcow2", False, ("format-match",)
    ),
    Case(
        "luks",
        lambda d: create_luks(d / "x.luks"),
        "raw",
        False,
        ("encrypted",),
        format="luks",
        stricter="Glance accepts a LUKS1 volume declared raw",
    ),
    Case("luks2", _luks2, "raw", False, ("encrypted",)),
    Case("qed", lambda d: create(d / "x.qed", "qed", "1M"), "raw", False, ("banned-format",)),
    Case(
        "qcow1-real",
        lambda d: create(d / "x.qcow", "qcow", "1M"),
        "qcow2",
        False,
        ("banned-format",),
        format="qcow",
    ),
    Case(
        "parallels-as-raw",
        lambda d: create(d / "x.hds", "parallels", "1M"),
        "raw",
        False,
        ("format-match",),
        format="parallels",
        stricter="Glance's inspector does not recognise Parallels images and stores them as raw",
        says=("Parallels",),
    ),
    Case(
        "parallels-as-ploop",
        lambda d: create(d / "x.hds", "parallels", "1M"),
        "ploop",
        True,
        format="parallels",
    ),
    Case("vmdk-monolithicSparse", _vmdk("monolithicSparse"), "vmdk", True, format="vmdk"),
    Case("vmdk-streamOptimized", _vmdk("streamOptimized"), "vmdk", True, format="vmdk"),
    Case(
        "vmdk-monolithicFlat",
        _vmdk("monolithicFlat"),
        "vmdk",
        False,
        ("vmdk-create-type", "vmdk-extent"),
        says=("monolithicFlat",),
    ),
    Case(
        "vmdk-twoGbMaxExtentSparse",
        _vmdk("twoGbMaxExtentSparse"),
        "vmdk",
        False,
        ("vmdk-create-type", "vmdk-extent"),
    ),
    Case(
        "vmdk-passwd-flat",
        _passwd_descriptor("monolithicFlat"),
        "vmdk",
        False,
        ("vmdk-create-type", "vmdk-extent"),
    ),
    Case(
        "vmdk-passwd-sparse",
        _passwd_descriptor("monolithicSparse"),
        "vmdk",
        False,
        ("vmdk-extent",),
        says=("/etc/passwd",),
    ),
    Case(
        "vmdk-descriptor-other-file",
        lambda d: write_descriptor(
            d / "desc.vmdk", "monolithicSparse", ['RW 2048 SPARSE "other.vmdk"']
        ),
        "vmdk",
        False,
        ("vmdk-extent",),
        says=("other.vmdk",),
        stricter="Glance accepts a monolithicSparse descriptor naming a file without '/'",
    ),
    Case(
        "vmdk-capacity0",
        _vmdk_capacity0,
        "vmdk",
        False,
        ("vmdk-extent",),
        stricter="QEMU follows the embedded descriptor of a capacity-0 sparse VMDK",
    ),
    Case(
        "vmdk-child",
        _vmdk_child,
        "vmdk",
        False,
        ("backing-file",),
        says=("parent.vmdk",),
        stricter="Glance's inspector ignores parentFileNameHint",
    ),
    Case("vmdk-stream-footer", _vmdk_stream_footer, "vmdk", True),
    Case(
        "vmdk-stream-bad-eos",
        lambda d: _vmdk_stream_footer(d, bad_eos=True),
        "vmdk",
        False,
        ("structure",),
        says=("end-of-stream",),
    ),
    Case(
        "vmdk-descriptor-sector-2",
        _vmdk_poked(lambda b: 28, struct.pack("<Q", 2)),
        "vmdk",
        False,
        ("vmdk-descriptor",),
    ),
    Case(
        "vmdk-descriptor-odd-line",
        _vmdk_poked(lambda b: b.index(b"#DDB"), b"XDDB"),
        "vmdk",
        False,
        ("vmdk-descriptor",),
        says=("XDDB",),
    ),
    Case("vhd-dynamic", _vhd("dynamic"), "vhd", True, format="vpc"),
    Case(
        "vhd-differencing",
        _vhd_differencing,
        "vhd",
        False,
        ("backing-file",),
        says=("parent.vhd",),
        stricter="Glance's inspector does not look at the VHD disk type",
    ),
    Case(
        "vhd-bad-dynamic-header",
        _vhd_bad_dynamic_header,
        "vhd",
        False,
        ("structure",),
        stricter="Glance's inspector reads only the VHD footer",
    ),
    Case(
        "vhdx-has-parent",
        _vhdx_has_parent,
        "vhdx",
        False,
        ("backing-file",),
        stricter="Glance's inspector does not look at VHDX parents",
    ),
    Case(
        "vhdx-no-valid-header",
        _vhdx_no_valid_header,
        "vhdx",
        False,
        ("structure",),
        says=("no valid VHDX header",),
        stricter="Glance's inspector does not check VHDX header checksums",
    ),
    Case(
        "vhdx-unreplayed-log",
        _vhdx_unreplayed_log,
        "vhdx",
        False,
        ("structure",),
        says=("log", "replay"),
        stricter="Glance's inspector does not look at the VHDX log",
    ),
    Case(
        "vhd-bad-footer-checksum",
        _vhd_bad_footer_checksum,
        "vhd",
        False,
        ("structure",),
        says=("footer checksum is wrong",),
        stricter="Glance's inspector does not check the VHD footer checksum",
    ),
    Case(
        "vmdk-gd-past-eof",
        _vmdk_gd_past_eof,
        "vmdk",
        False,
        ("structure",),
        says=("grain directory", "past the end of the file"),
        stricter="Glance's inspector does not look at the VMDK grain directory",
    ),
    Case(
        "vdi-parent",
        _vdi_poked(0x1B8, b"\x11" * 16),
        "vdi",
        False,
        ("backing-file",),
        stricter="Glance's inspector does not look at VDI parents",
    ),
    Case(
        "vdi-bad-block-size",
        _vdi_poked(0x178, struct.pack("<I", 2 << 20)),
        "vdi",
        False,
        ("structure",),
        says=("block size",),
        stricter="Glance's inspector reads only the VDI signature and size",
    ),
    Case(
        "iso-truncated",
        _iso_truncated,
        "iso",
        False,
        ("structure",),
        stricter="Glance's inspector does not compare the ISO volume with the file",
    ),
    Case("vhd-as-vpc", _vhd("dynamic"), "vpc", False, ("format-match",), says=("'vhd'",)),
    Case(
        "vhd-fixed",
        _vhd("fixed"),
        "vhd",
        False,
        ("format-match",),
        format="vpc",
        says=("fixed VHD",),
    ),
    Case("vhd-fixed-as-raw", _vhd("fixed"), "raw", True, warnings=("format-match",)),
    Case("vhdx", lambda d: create(d / "x.vhdx", "vhdx", "10M"), "vhdx", True, format="vhdx"),
    Case("vdi", lambda d: create(d / "x.vdi", "vdi", "10M"), "vdi", True, format="vdi"),
    Case("vdi-static", lambda d: create(d / "s.vdi", "vdi", "1M", "static=on"), "vdi", True),
    Case("raw-mbr", lambda d: write_mbr_disk(d / "mbr.raw"), "raw", True, format="raw"),
    Case("raw-gpt", lambda d: write_gpt_disk(d / "gpt.raw"), "raw", True, format="raw"),
    Case(
        "raw-mbr-bad-boot",
        lambda d: write_mbr_disk(d / "bad.raw", boot=0x12),
        "raw",
        False,
        ("mbr",),
    ),
    Case(
        "raw-mbr-no-partitions",
        lambda d: write_mbr_disk(d / "empty.raw", os_type=0),
        "raw",
        False,
        ("mbr",),
    ),
    Case("iso", lambda d: write_iso(d / "x.iso"), "iso", True, format="iso"),
    Case("iso-as-raw", lambda d: write_iso(d / "x.iso"), "raw", True),
    Case("iso-hybrid", lambda d: write_iso(d / "h.iso", with_mbr=True), "iso", True),
    Case("garbage-as-raw", _garbage, "raw", True, format="raw"),
    Case("garbage-as-qcow2", _garbage, "qcow2", False, ("format-match",)),
    Case("empty-as-raw", lambda d: _write(d / "empty.img", b""), "raw", True),
)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def build_all(root: Path) -> dict[str, Path]:
    """Build every case in its own directory under ``root``."""
    out = {}
    for case in CASES:
        d = root / case.name
        d.mkdir()
        out[case.name] = case.build(d)
    return out
