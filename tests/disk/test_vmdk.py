"""VMDK reader and writer against qemu-img: reads byte-identical to ``qemu-img convert
-O raw``, written images equal in ``qemu-img compare``, hostile images refused fast."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from qcowlib.core.chain import SAFE, BackingPolicy
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import (
    BackingLoop,
    BackingMismatch,
    BackingNotFound,
    CorruptImage,
    FormatError,
    QcowlibError,
    TruncatedImage,
    UnsafeBackingPath,
)
from qcowlib.formats.opener import open_disk
from qcowlib.formats.raw.reader import RawDisk
from qcowlib.formats.vmdk.output import write_vmdk
from qcowlib.formats.vmdk.reader import VmdkDisk, open_vmdk
from tests.conftest import qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")
WRITES = ["write -P 0xab 0 64k", "write -P 0x11 5M 1M", "write -z 20M 1M", "write -P 7 29M 512"]


def make(path: Path, subformat: str) -> Path:
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", path, "30M")
    args = ["qemu-io", "-f", "vmdk"] + [a for w in WRITES for a in ("-c", w)]
    subprocess.run([*args, str(path)], check=True, capture_output=True)
    return path


def seeded_raw(path: Path, size: int = 3 << 20, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for _ in range(6):
            n = rng.randrange(1, 300_000)
            f.seek(rng.randrange(0, size - n))
            f.write(rng.randbytes(n))
    return path


def reference(path: Path) -> bytes:
    out = path.with_suffix(".ref")
    qemu_img("convert", "-f", "vmdk", "-O", "raw", path, out)
    return out.read_bytes()


def ours(path: Path, policy: object = None) -> bytes:
    with open_vmdk(HostFile(str(path)), str(path), policy) as d:  # type: ignore[arg-type]
        return d.read(0, d.virtual_size)


@pytest.mark.parametrize(
    "subformat",
    ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"],
)
def test_qemu_images_read_identical(tmp_path: Path, subformat: str) -> None:
    p = make(tmp_path / "d.vmdk", subformat)
    with open_vmdk(HostFile(str(p)), str(p), SAFE) as d:
        assert isinstance(d, VmdkDisk) and d.format == "vmdk" and d.subformat == subformat
        assert d.virtual_size == qemu_json("info", p)["virtual-size"]
        assert d.cid == qemu_json("info", p)["format-specific"]["data"]["cid"]
    assert ours(p, SAFE) == reference(p)


def test_stream_optimized_from_qemu(tmp_path: Path) -> None:
    raw = seeded_raw(tmp_path / "s.raw")
    p = tmp_path / "s.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, p)
    assert ours(p) == reference(p)


def test_zeroed_grains(tmp_path: Path) -> None:
    p = tmp_path / "z.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", p, "4M")
    cmds = ["write -P 1 0 1M", "write -z 0 256k"]
    subprocess.run(
        ["qemu-io", "-f", "vmdk", *[a for c in cmds for a in ("-c", c)], str(p)], check=True
    )
    assert ours(p) == reference(p)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_writer_read_back_by_qemu(tmp_path: Path, subformat: str) -> None:
    raw = seeded_raw(tmp_path / "src.raw", (5 << 20) + 1536, seed=7)
    out = tmp_path / "out.vmdk"
    fd = os.open(out, os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    try:
        with RawDisk(HostFile(str(raw)), str(raw)) as src:
            write_vmdk(src, fd, subformat=subformat, extent_name=out.name)
    finally:
        os.close(fd)
    qemu_img("compare", "-f", "raw", "-F", "vmdk", raw, out)
    qemu_img("check", out)
    info = qemu_json("info", out)["format-specific"]["data"]
    assert info["create-type"] == subformat
    assert ours(out) == raw.read_bytes()


def _sparse(tmp_path: Path) -> bytearray:
    return bytearray(make(tmp_path / "h.vmdk", "monolithicSparse").read_bytes())


def _expect(
    tmp_path: Path, blob: bytes | bytearray, error: type[QcowlibError], policy: object = None
) -> None:
    p = tmp_path / "bad.vmdk"
    p.write_bytes(blob)
    with pytest.raises(error):
        ours(p, policy)


def test_hostile_headers(tmp_path: Path) -> None:
    blob = _sparse(tmp_path)
    bad = bytearray(blob)
    bad[0:4] = b"KDMX"  # not a magic: read as a descriptor, which it is not
    _expect(tmp_path, bad, FormatError)
    bad = bytearray(blob)
    struct.pack_into("<Q", bad, 56, 1 << 40)  # grain directory past EOF
    _expect(tmp_path, bad, TruncatedImage)
    bad = bytearray(blob)
    struct.pack_into("<QQ", bad, 12, (1 << 54) - 1, 1)  # huge capacity, 1-sector grains
    _expect(tmp_path, bad, FormatError)
    bad = bytearray(blob)
    struct.pack_into("<I", bad, 44, 1 << 30)  # huge grain tables
    _expect(tmp_path, bad, CorruptImage)


def test_truncated_stream(tmp_path: Path) -> None:
    raw = seeded_raw(tmp_path / "s.raw")
    out = tmp_path / "s.vmdk"
    fd = os.open(out, os.O_CREAT | os.O_RDWR)
    with RawDisk(HostFile(str(raw)), str(raw)) as src:
        write_vmdk(src, fd, subformat="streamOptimized")
    os.close(fd)
    _expect(tmp_path, out.read_bytes()[:-4096], FormatError)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "sub/../../x"])
def test_escaping_extents_refused_under_safe(tmp_path: Path, name: str) -> None:
    desc = (
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\nRW 8 FLAT "{name}" 0\n'
    )
    _expect(tmp_path, desc.encode(), UnsafeBackingPath, SAFE)


def _qemu_io(path: Path, *cmds: str) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "vmdk", *args, str(path)], check=True, capture_output=True)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse"])
def test_delta_disks_read_through_their_parents(tmp_path: Path, subformat: str) -> None:
    """A 3-deep VMDK chain (parentFileNameHint) reads as qemu-img reads it."""
    base = make(tmp_path / "base.vmdk", subformat)
    mid, top = tmp_path / "mid.vmdk", tmp_path / "top.vmdk"
    writes = {mid: ("write -P 0x21 5M 64k", "write -P 0x22 12M 1M"),
              top: ("write -P 0x31 12M 4k", "write -P 0x32 28M 2M")}  # fmt: skip
    for child, parent in ((mid, base), (top, mid)):
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", "-b", parent.name,
                 "-F", "vmdk", child)  # fmt: skip
        _qemu_io(child, *writes[child])
    with open_disk(str(top), policy=SAFE) as d:
        assert [layer.filename for layer in d.chain] == [str(top), str(mid), str(base)]
        assert d.read(0, d.virtual_size) == reference(top)
        assert isinstance(d, VmdkDisk) and d.parent_file_name == "mid.vmdk"


def test_delta_disk_parent_policy(tmp_path: Path) -> None:
    base = make(tmp_path / "base.vmdk", "monolithicSparse")
    (tmp_path / "sub").mkdir()
    top = tmp_path / "sub" / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk", top)
    with open_disk(str(top)) as d:  # qemu-img's defaults follow ../
        assert d.read(0, d.virtual_size) == reference(base)
    with pytest.raises(UnsafeBackingPath):
        open_disk(str(top), policy=SAFE)
    with open_disk(str(top), policy=BackingPolicy(follow=False)) as d:
        assert d.backing is None and d.read(0, 65536) == bytes(65536)
    base.unlink()
    with pytest.raises(BackingNotFound):
        open_disk(str(top))


def test_delta_disk_over_a_changed_parent_is_refused(tmp_path: Path) -> None:
    base = make(tmp_path / "base.vmdk", "monolithicSparse")
    top = tmp_path / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", top)
    _qemu_io(base, "write -P 0x44 0 4k")  # a write changes the parent's CID
    assert qemu_img("convert", "-O", "raw", top, tmp_path / "q.raw", check=False).returncode
    with pytest.raises(BackingMismatch, match="parent changed"):
        open_disk(str(top))


def test_delta_disk_naming_itself_is_a_loop(tmp_path: Path) -> None:
    p = make(tmp_path / "self.vmdk", "monolithicSparse")
    blob = p.read_bytes()
    hint = b'parentFileNameHint="self.vmdk"\n'
    at = blob.index(b"# Extent description")
    p.write_bytes(blob[:at] + hint + blob[at + len(hint) :])  # inside the descriptor area
    with pytest.raises(BackingLoop):
        open_disk(str(p))


def test_parent_cid_without_hint_reads_alone(tmp_path: Path) -> None:
    desc = (
        '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=2\ncreateType="monolithicFlat"\n'
        'RW 8 FLAT "x" 0\n'
    )
    (tmp_path / "x").write_bytes(b"\x5a" * 4096)
    p = tmp_path / "d.vmdk"
    p.write_bytes(desc.encode())
    with open_disk(str(p)) as d:
        assert d.backing is None and d.read(0, 4096) == b"\x5a" * 4096


def test_descriptors_that_are_not_ascii_read_as_qemu_reads_them(tmp_path: Path) -> None:
    """VMware writes extent file names and ddb values in the encoding it declares (a VM
    named "Café" on Windows): such descriptors were refused ("not ASCII text") although
    qemu-img reads them.  An extent name that is not UTF-8 still names its file."""
    flat = make(tmp_path / "m.vmdk", "monolithicFlat")
    name = "caf\xe9-flat.vmdk".encode("latin-1")
    os.rename(tmp_path / "m-flat.vmdk", os.path.join(os.fsencode(tmp_path), name))
    text = flat.read_bytes().replace(b'"m-flat.vmdk"', b'"' + name + b'"')
    flat.write_bytes(text + b'ddb.comment = "V\xc3\xa9hicule \xe9t\xe9"\n')
    sparse = make(tmp_path / "s.vmdk", "monolithicSparse")
    raw = bytearray(sparse.read_bytes())
    desc_at = struct.unpack_from("<Q", raw, 28)[0] * 512
    end = raw.index(b"\0", desc_at)
    raw[end : end + 20] = b'ddb.x = "caf\xe9"\n'.ljust(20, b"\0")
    sparse.write_bytes(bytes(raw))
    for image in (flat, sparse):
        assert ours(image) == reference(image), image
        assert qemu_json("info", image)["virtual-size"] == 30 << 20
    # Glance's image inspector refuses them: validate still does (not structural).
    from qcowlib.validate import validate

    report = validate(sparse, "glance", "vmdk")
    assert not report.ok
    assert any("not ASCII" in f.message for f in report.findings if f.rule == "vmdk-descriptor")
    assert validate(sparse, "permissive", "vmdk").ok
