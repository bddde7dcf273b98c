"""resize, rebase and commit compared with qemu-img doing the same on a copy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli, qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")


def io(path: Path, *cmds: str) -> None:
    argv = ["qemu-io"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def clean(img: Path) -> None:
    res = qemu_img("check", img, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def chain(tmp: Path, opts: str = "cluster_size=65536") -> tuple[Path, Path, Path]:
    """base <- mid <- top with data at every level and some zero writes."""
    base, mid, top = tmp / "base.qcow2", tmp / "mid.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, base, "16M")
    io(base, "write -P 1 0 4M", "write -P 2 8M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", mid)
    io(mid, "write -P 3 1M 512k", "write -z 2M 64k", "write -P 4 12M 100k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "mid.qcow2", "-F", "qcow2", top)
    io(top, "write -P 5 1536k 64k", "write -P 6 3M 7000", "write -z 8M 4k")
    return base, mid, top


def twin(tmp: Path, name: str, opts: str = "cluster_size=65536") -> Path:
    d = tmp / name
    d.mkdir()
    chain(d, opts)
    return d


@pytest.mark.parametrize(
    "opts", ["cluster_size=65536", "cluster_size=4096,compat=0.10", "extended_l2=on"]
)
def test_rebase_safe_like_qemu(opts: str, tmp_path: Path) -> None:
    ours, ref = twin(tmp_path, "ours", opts), twin(tmp_path, "ref", opts)
    res = cli("rebase", "-b", "base.qcow2", "-F", "qcow2", ours / "top.qcow2")
    assert res.returncode == 0, res.stderr
    qemu_img("rebase", "-b", "base.qcow2", "-F", "qcow2", ref / "top.qcow2")
    clean(ours / "top.qcow2")
    assert qemu_json("info", ours / "top.qcow2")["backing-filename"] == "base.qcow2"
    assert qemu_img("compare", ours / "top.qcow2", ref / "top.qcow2").returncode == 0
    # and content did not change: compare with the untouched chain of a third copy
    orig = twin(tmp_path, "orig", opts)
    assert qemu_img("compare", ours / "top.qcow2", orig / "top.qcow2").returncode == 0


def test_rebase_to_nothing_and_unsafe(tmp_path: Path) -> None:
    ours, orig = twin(tmp_path, "ours"), twin(tmp_path, "orig")
    res = cli("rebase", "-b", "", ours / "top.qcow2")
    assert res.returncode == 0, res.stderr
    clean(ours / "top.qcow2")
    assert "backing-filename" not in qemu_json("info", ours / "top.qcow2")
    assert qemu_img("compare", ours / "top.qcow2", orig / "top.qcow2").returncode == 0
    # -u only rewrites the header
    shutil.copy(orig / "top.qcow2", tmp_path / "u.qcow2")
    res = cli("rebase", "-u", "-b", "orig/base.qcow2", "-F", "qcow2", tmp_path / "u.qcow2")
    assert res.returncode == 0, res.stderr
    info = qemu_json("info", tmp_path / "u.qcow2")
    assert info["backing-filename"] == "orig/base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    clean(tmp_path / "u.qcow2")
    assert cli("rebase", "-b", "base.qcow2", ours / "top.qcow2").returncode == 1  # no -F


@pytest.mark.parametrize("drop", [False, True])
def test_commit_like_qemu(drop: bool, tmp_path: Path) -> None:
    ours, ref = twin(tmp_path, "ours"), twin(tmp_path, "ref")
    flags = ["-d"] if drop else []
    res = cli("commit", *flags, ours / "top.qcow2")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "Image committed.\n"
    qemu_img("commit", "-q", *flags, ref / "top.qcow2")
    for name in ("mid.qcow2", "top.qcow2"):
        clean(ours / name)
        assert qemu_img("compare", ours / name, ref / name).returncode == 0, name
    ours_map = [e for e in qemu_json("map", ours / "top.qcow2") if e["depth"] == 0 and e["present"]]
    ref_map = [e for e in qemu_json("map", ref / "top.qcow2") if e["depth"] == 0 and e["present"]]
    assert bool(ours_map) == bool(ref_map)


def test_commit_into_raw(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x07" * (1 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    io(top, "write -P 9 4096 8192")
    assert cli("commit", top).returncode == 0
    data = base.read_bytes()
    assert data[4096:12288] == b"\x09" * 8192 and data[:4096] == b"\x07" * 4096


@pytest.mark.parametrize(
    ("opts", "sizes"),
    [
        ("cluster_size=65536", ["+1G", "20M", "-3M"]),
        ("cluster_size=512", ["+40M", "1000448"]),
        ("extended_l2=on", ["+100M", "5M"]),
        ("compat=0.10", ["200M", "-150M"]),
        ("cluster_size=4096,refcount_bits=1", ["+8M", "12M", "+1M"]),
    ],
)
def test_resize_like_qemu(opts: str, sizes: list[str], tmp_path: Path) -> None:
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    for img in (ours, ref):
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, "16M")
        io(img, "write -P 1 0 2M", "write -P 2 10M 3M", "write -P 3 15M 1M")
    for size in sizes:
        before = qemu_json("info", ref)["virtual-size"]
        res = cli("resize", "--shrink", ours, size)
        assert res.returncode == 0, res.stderr
        qemu_img("resize", "-q", "--shrink", ref, size)
        clean(ours)
        after = qemu_json("info", ref)["virtual-size"]
        assert qemu_json("info", ours)["virtual-size"] == after
        assert qemu_img("compare", ours, ref).returncode == 0
        if after < before:
            # the clusters freed at the end are cut off the file, as qemu-img does (its
            # file may end inside its last cluster, after a grow wrote the new L1 there)
            cs = qemu_json("info", ref)["cluster-size"]
            assert -(-ours.stat().st_size // cs) == -(-ref.stat().st_size // cs)


def test_shrink_frees_compressed_clusters(tmp_path: Path) -> None:
    """Compressed clusters past the new end lose their references (several may share a
    host cluster); the result is clean and the file ends where qemu-img's does."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * (64 * 1024))  # 16 MiB, compressible
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    for img in (ours, ref):
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, img)
    assert cli("resize", "--shrink", ours, "3M").returncode == 0
    qemu_img("resize", "-q", "--shrink", ref, "3M")
    clean(ours)
    assert qemu_img("compare", ours, ref).returncode == 0
    assert -(-ours.stat().st_size // 4096) == -(-ref.stat().st_size // 4096)


def test_shrink_needs_flag_and_raw_resize(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    res = cli("resize", img, "8M")
    assert res.returncode == 1 and "--shrink" in res.stderr
    res = cli("resize", "--shrink", img, "1000000")
    assert res.returncode == 1 and "multiple of 512" in res.stderr
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"x" * 4096)
    assert cli("resize", "-f", "raw", raw, "+1M").returncode == 0
    assert raw.stat().st_size == 4096 + (1 << 20)


def test_commit_refuses_unrecorded_backing_format(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    io(top, "write -P 0x51 0 512")  # data that would land in the base's first sector
    raw = bytearray(top.read_bytes())
    pos = raw.find((0xE2792ACA).to_bytes(4, "big"))
    raw[pos : pos + 4] = (0x0BADF00D).to_bytes(4, "big")  # drop the backing format record
    top.write_bytes(bytes(raw))
    res = cli("commit", top)
    assert res.returncode == 1 and "format" in res.stderr
    assert base.read_bytes() == bytes(1 << 20)


def test_convert_never_replaces_its_new_backing_file(tmp_path: Path) -> None:
    base, _, top = chain(tmp_path)
    before = base.read_bytes()
    res = cli("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", top, base)
    assert res.returncode == 1 and "same file" in res.stderr
    assert base.read_bytes() == before
