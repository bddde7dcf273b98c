"""``amend`` and ``bitmap`` against qemu-img amend/bitmap on copies of the same image:
``qemu-img info --output json``, ``check``, ``compare`` and ``map`` as the oracle."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import cli, qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")


def io(path: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def clean(img: Path) -> None:
    res = qemu_img("check", img, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found" in res.stdout


def image(tmp: Path, opts: str, name: str = "a.qcow2", backing: Path | None = None) -> Path:
    img = tmp / name
    extra = ["-b", backing.name, "-F", "qcow2"] if backing else []
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, *extra, img, "4M")
    io(
        img,
        "write -P 1 0 64k",
        "write -z 128k 64k",
        "write -P 2 256k 64k",
        "write -z 256k 64k",
        "write -c -P 3 1M 64k",
        "write -P 4 2M 5000",
    )
    return img


def twins(tmp: Path, opts: str, *, backing: bool = False) -> tuple[Path, Path]:
    pair = []
    for name in ("ours", "ref"):
        d = tmp / name
        d.mkdir()
        base = None
        if backing:
            base = d / "base.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", base, "4M")
            io(base, "write -P 9 0 4M")
        pair.append(image(d, opts, backing=base))
    return pair[0], pair[1]


def mapped(img: Path) -> list[dict[str, Any]]:
    """qemu-img map entries; whether a data cluster of zeros is a hole in the file is
    the file system's business (qemu-img's own result varies with the cluster size)."""
    import json

    out = json.loads(qemu_img("map", "--output=json", img).stdout)
    for e in out:
        if e["data"]:
            e.pop("zero")
    return list(out)


def spec(img: Path) -> dict[str, Any]:
    data: dict[str, Any] = qemu_json("info", img)["format-specific"]["data"]
    return data


AMENDS = [
    ("compat=1.1", "compat=0.10"),
    ("compat=0.10", "compat=1.1"),
    ("compat=0.10", "compat=v3,refcount_bits=8,lazy_refcounts=on"),
    ("compat=1.1", "lazy_refcounts=on"),
    ("compat=1.1,lazy_refcounts=on", "lazy_refcounts=off"),
    ("compat=1.1", "refcount_bits=1"),
    ("compat=1.1", "refcount_bits=64"),
    ("compat=1.1,refcount_bits=8", "compat=0.10,refcount_bits=16"),
    ("cluster_size=512", "refcount_bits=8"),
    ("cluster_size=4096", "compat=0.10"),
    ("compat=1.1", "size=8M"),
    ("compat=1.1", "size=3M"),
]


@pytest.mark.parametrize(("create", "change"), AMENDS)
def test_amend_like_qemu(create: str, change: str, tmp_path: Path) -> None:
    ours, ref = twins(tmp_path, create)
    orig = tmp_path / "orig.qcow2"
    shutil.copy(ours, orig)
    res = cli("amend", "-o", change, ours)
    assert res.returncode == 0, res.stderr
    qemu_img("amend", "-o", change, ref)
    clean(ours)
    assert spec(ours) == spec(ref)
    assert qemu_json("info", ours)["virtual-size"] == qemu_json("info", ref)["virtual-size"]
    assert qemu_img("compare", ours, ref).returncode == 0
    assert cli("check", ours).returncode == 0
    if "size" not in change:
        assert qemu_img("compare", ours, orig).returncode == 0
    if "compat" in change:  # zero clusters expanded the same way
        assert mapped(ours) == mapped(ref)


def test_downgrade_with_backing_and_snapshot(tmp_path: Path) -> None:
    ours, ref = twins(tmp_path, "compat=1.1", backing=True)
    for img in (ours, ref):
        qemu_img("snapshot", "-c", "s", img)
        io(img, "write -z 64k 64k", "write -z 3M 64k")
    assert cli("amend", "-o", "compat=0.10", ours).returncode == 0
    qemu_img("amend", "-o", "compat=0.10", ref)
    clean(ours)
    assert spec(ours) == spec(ref)
    assert qemu_img("compare", ours, ref).returncode == 0
    for img in (ours, ref):
        qemu_img("snapshot", "-a", "s", img)
    assert qemu_img("compare", ours, ref).returncode == 0


@pytest.mark.parametrize(
    ("create", "change", "message"),
    [
        ("compat=1.1", "cluster_size=4096", "only supported for image creation"),
        ("compat=0.10", "lazy_refcounts=on", "Lazy refcounts only supported"),
        ("compat=0.10", "refcount_bits=8", "Refcount widths other than 16 bits"),
        ("compat=1.1", "refcount_bits=3", "Refcount width must be a power of two"),
        ("compat=1.1", "compat=0.9", "Unknown compatibility level 0.9"),
        ("compat=1.1", "foo=1", "Invalid parameter 'foo'"),
        ("refcount_bits=8", "compat=0.10", "compat=0.10 requires refcount_bits=16"),
        ("extended_l2=on", "compat=0.10", "incompatible features 0x10"),
        ("cluster_size=512", "refcount_bits=4", "Cannot decrease refcount entry width to 4 bits"),
    ],
)
def test_amend_refusals_like_qemu(create: str, change: str, message: str, tmp_path: Path) -> None:
    ours, ref = twins(tmp_path, create)
    before = ours.read_bytes()
    res = cli("amend", "-o", change, ours)
    assert res.returncode == 1 and message in res.stderr, res.stderr
    assert ours.read_bytes() == before
    theirs = qemu_img("amend", "-o", change, ref, check=False)
    assert theirs.returncode == 1 and message in theirs.stderr


def test_amend_needs_options(tmp_path: Path) -> None:
    ours, _ = twins(tmp_path, "compat=1.1")
    res = cli("amend", ours)
    assert res.returncode == 1 and "Must specify options (-o)" in res.stderr


# -- bitmaps ----------------------------------------------------------------------------
def bits(img: Path, name: str) -> tuple[list[int], int]:
    from qcowlib.formats.opener import open_disk
    from qcowlib.formats.qcow2.bitmap_rw import BITMAPS

    with open_disk(str(img)) as disk:
        data, gbits = BITMAPS.read(disk, name)
    return np.flatnonzero(np.unpackbits(data, bitorder="little")).tolist(), gbits


SEQUENCE = [
    ["--add", "b0"],
    ["--add", "-g", "4096", "--disable", "b1"],
    ["--add", "-g", "1M", "b2"],
    ["--enable", "b1"],
    ["WRITE"],
    ["--disable", "b0"],
    ["--merge", "b1", "b2"],
    ["--merge", "b0", "--clear", "b1"],
    ["--add", "--merge", "b1", "--remove", "b3"],
    ["--remove", "b0"],
]


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512", "refcount_bits=1"])
def test_bitmap_sequence_like_qemu(opts: str, tmp_path: Path) -> None:
    ours, ref = twins(tmp_path, opts)
    for step in SEQUENCE:
        if step == ["WRITE"]:  # qemu records guest writes in the enabled bitmaps
            for img in (ours, ref):
                io(img, "write 100k 10k", "write 3M 1k", "write -z 1536k 8k")
            continue
        *flags, name = step
        res = cli("bitmap", *flags, ours, name)
        assert res.returncode == 0, (step, res.stderr)
        qemu_img("bitmap", *flags, ref, name)
        clean(ours)
        assert spec(ours).get("bitmaps") == spec(ref).get("bitmaps"), step
        for bm in spec(ref).get("bitmaps", []):
            assert bits(ours, bm["name"]) == bits(ref, bm["name"]), (step, bm)
    assert qemu_img("compare", ours, ref).returncode == 0
    assert cli("check", ours).returncode == 0  # qcowlib's own check agrees


def test_bitmap_merge_from_another_file(tmp_path: Path) -> None:
    ours, ref = twins(tmp_path, "compat=1.1")
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "4M")
    qemu_img("bitmap", "--add", "-g", "8k", src, "s")
    io(src, "write 0 1k", "write 2M 300k")
    for img, tool in ((ours, cli), (ref, qemu_img)):
        tool("bitmap", "--add", img, "t")
        res = tool("bitmap", "--merge", "s", "-b", src, "-F", "qcow2", img, "t")
        assert res.returncode == 0, res.stderr
    clean(ours)
    assert bits(ours, "t") == bits(ref, "t")


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ([], ["--remove", "IMG", "nope"], "Dirty bitmap 'nope' not found"),
        (["b0"], ["--add", "IMG", "b0"], "Bitmap already exists: b0"),
        ([], ["--add", "-g", "1000", "IMG", "x"], "Granularity must be power of 2"),
        ([], ["--clear", "-g", "4096", "IMG", "x"], "granularity only supported with --add"),
        ([], ["IMG", "x"], "Need at least one of"),
        ([], ["--add", "IMG", ""], "Bitmap name cannot be empty"),
        (["b0"], ["--merge", "nope", "IMG", "b0"], "Dirty bitmap 'nope' not found"),
    ],
)
def test_bitmap_refusals_like_qemu(
    setup: list[str], args: list[str], message: str, tmp_path: Path
) -> None:
    ours, ref = twins(tmp_path, "compat=1.1")
    for img in (ours, ref):
        for name in setup:
            qemu_img("bitmap", "--add", img, name)
    res = cli("bitmap", *[str(ours) if a == "IMG" else a for a in args])
    assert res.returncode == 1 and message in res.stderr, res.stderr
    theirs = qemu_img("bitmap", *[str(ref) if a == "IMG" else a for a in args], check=False)
    assert theirs.returncode == 1 and message in theirs.stderr
    clean(ours)


def test_bitmap_on_v2_refused(tmp_path: Path) -> None:
    ours, _ = twins(tmp_path, "compat=0.10")
    res = cli("bitmap", "--add", ours, "x")
    assert res.returncode == 1 and "Cannot store dirty bitmaps in qcow2 v2 files" in res.stderr


def test_downgrade_frees_bitmaps(tmp_path: Path) -> None:
    ours, ref = twins(tmp_path, "compat=1.1")
    for img in (ours, ref):
        qemu_img("bitmap", "--add", img, "b")
        io(img, "write 0 64k")
    assert cli("amend", "-o", "compat=0.10", ours).returncode == 0
    qemu_img("amend", "-o", "compat=0.10", ref)
    clean(ours)  # qemu-img leaks the bitmap's clusters here; qcowlib frees them
    assert spec(ours) == spec(ref)
    assert qemu_img("compare", ours, ref).returncode == 0


def test_amend_option_help_lines_are_qemus(tmp_path: Path) -> None:
    ours, _ = twins(tmp_path, "compat=1.1")
    res = cli("amend", "-o", "help", ours)
    assert res.returncode == 0, res.stderr
    theirs = qemu_img("amend", "-f", "qcow2", "-o", "help", ours).stdout.splitlines()
    lines = res.stdout.splitlines()
    assert lines[0] == theirs[0] == "Amend options for 'qcow2':"
    assert len(lines) > 5 and set(lines) <= set(theirs)  # what qcowlib changes, word for word


def test_writer_records_writes_in_enabled_bitmaps_like_qemu(tmp_path: Path) -> None:
    import qcowlib

    ours, ref = twins(tmp_path, "compat=1.1")
    for img in (ours, ref):
        qemu_img("bitmap", "--add", "-g", "4096", img, "on")
        qemu_img("bitmap", "--add", "--disable", img, "off")
        qemu_img("bitmap", "--add", "-g", "1M", img, "coarse")
    writes = [("write", 5000, 3000), ("zero", 1 << 20, 70_000), ("discard", 2 << 20, 131072)]
    with qcowlib.open_rw(str(ours)) as disk:
        for op, offset, length in writes:
            if op == "write":
                disk.write(offset, b"\x42" * length)
            elif op == "zero":
                disk.write_zeroes(offset, length)
            else:
                disk.discard(offset, length)
    io(ref, "write -P 0x42 5000 3000", f"write -z {1 << 20} 70000", f"discard {2 << 20} 131072")
    clean(ours)
    assert spec(ours)["bitmaps"] == spec(ref)["bitmaps"]  # flags: in-use cleared again
    for name in ("on", "off", "coarse"):
        assert bits(ours, name) == bits(ref, name), name
    assert qemu_img("compare", ours, ref).returncode == 0


def test_a_bitmap_name_that_is_not_utf8_reads_as_in_qemu_img(tmp_path: Path) -> None:
    """A bitmap name in another tool's legacy encoding made `info` fail ("undecodable
    name"); qemu-img shows it with U+FFFD, and rewriting the directory keeps its bytes."""
    import json
    import struct

    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_img("bitmap", "--add", img, "bm0")
    raw = img.read_bytes()
    (at,) = struct.unpack_from(">I", raw, 100)  # header_length: extensions follow
    while True:
        kind, length = struct.unpack_from(">II", raw, at)
        if kind == 0x23852875:
            break
        at += 8 + (length + 7) // 8 * 8
    (directory,) = struct.unpack_from(">Q", raw, at + 8 + 16)
    (extra,) = struct.unpack_from(">I", raw, directory + 20)
    with img.open("r+b") as f:
        f.seek(directory + 24 + extra)
        f.write(b"\xe9\xff")  # "bm0" becomes b"\xe9\xff0"
    shown = qemu_json("info", img)["format-specific"]["data"]["bitmaps"]
    res = cli("info", "--output=json", img)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["format-specific"]["data"]["bitmaps"] == shown
    assert shown[0]["name"] == "\ufffd\ufffd0"
    res = cli("bitmap", "--add", img, "b1")
    assert res.returncode == 0, res.stderr
    clean(img)
    names = [b["name"] for b in qemu_json("info", img)["format-specific"]["data"]["bitmaps"]]
    assert names == ["\ufffd\ufffd0", "b1"]
    assert b"\xe9\xff0" in img.read_bytes()
