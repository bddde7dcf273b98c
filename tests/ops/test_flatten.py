"""flatten and flatten_stream: chains of mixed formats into one standalone image."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qcowlib
from qcowlib.ops.flatten import flatten, flatten_stream
from tests.conftest import qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")


def io(path: Path, fmt: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def make_chain(tmp: Path, depth: int) -> Path:
    """raw base (3-deep) or qcow2 base, then qcow2 overlays with other cluster sizes."""
    if depth == 3:
        base = tmp / "base.raw"
        qemu_img("create", "-q", "-f", "raw", base, "24M")
        io(base, "raw", "write -P 0x11 0 3M", "write -P 0x12 20M 1M")
        bfmt = "raw"
    else:
        base = tmp / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "24M")
        io(base, "qcow2", "write -P 0x11 0 3M", "write -c -P 0x13 8M 64k", "write -P 0x12 20M 1M")
        bfmt = "qcow2"
    mid = tmp / "mid.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", base.name, "-F", bfmt, mid
    )
    io(mid, "qcow2", "write -P 0x21 1M 100k", "write -z 2M 64k", "write -P 0x22 21M 7000")
    top = mid
    if depth == 3:
        top = tmp / "top.qcow2"
        qemu_img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "-b",
            mid.name,
            "-F",
            "qcow2",
            top,
        )
        io(top, "qcow2", "write -P 0x31 5M 3M", "write -z 20M 512k")
    return top


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize(
    ("out_format", "compress"), [("qcow2", False), ("qcow2", True), ("raw", False)]
)
def test_flatten_chain(depth: int, out_format: str, compress: bool, tmp_path: Path) -> None:
    top = make_chain(tmp_path, depth)
    out = tmp_path / f"flat.{out_format}"
    flatten(str(top), str(out), out_format, compress=compress)
    info = qemu_json("info", out)
    assert info["format"] == out_format
    assert "backing-filename" not in info
    if out_format == "qcow2":
        assert qemu_img("check", out, check=False).returncode == 0
        assert info["format-specific"]["data"]["extended-l2"] is False
    assert qemu_img("compare", "-F", out_format, top, out).returncode == 0
    # the stream is the same bytes, and its size is announced before the first byte
    stream = flatten_stream(str(top), out_format, compress=compress)
    announced = stream.size
    digest = hashlib.sha256()
    total = 0
    for piece in stream:
        assert 0 < len(piece) < 1 << 20  # Glance's uWSGI refuses chunks of 1 MiB or more
        digest.update(piece)
        total += len(piece)
    assert total == announced
    assert digest.hexdigest() == hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.fixture
def fixed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """VMDK CIDs and VDI UUIDs held fixed: two writes of one image are the same bytes."""
    import uuid

    monkeypatch.setattr(random, "getrandbits", lambda bits: 0x1234ABCD)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=42))


@pytest.mark.parametrize(
    ("out_format", "options", "compress"),
    [
        ("qcow2", {}, False),
        ("qcow2", {"cluster_size": "4096"}, True),
        ("raw", {}, False),
        ("vmdk", {"subformat": "streamOptimized"}, True),
        ("vdi", {}, False),
    ],
)
@pytest.mark.usefixtures("fixed_ids")
def test_writers_feed_hashers_in_file_order(
    out_format: str, options: dict[str, str], compress: bool, tmp_path: Path
) -> None:
    """flatten and convert hand every output byte to the hashers, in file order: their
    digests equal hashlib's over the written file, which is the image written without
    hashers (same bytes)."""
    top = make_chain(tmp_path, 3)
    plain, hashed = tmp_path / f"unhash.{out_format}", tmp_path / f"hashed.{out_format}"
    flatten(str(top), str(plain), out_format, options=options, compress=compress)
    for write in (flatten, qcowlib.convert):
        md5, sha512 = hashlib.md5(), hashlib.sha512()
        write(str(top), str(hashed), out_format, options=options, compress=compress,
              hashers=[md5, sha512])  # fmt: skip
        data = hashed.read_bytes()
        assert md5.hexdigest() == hashlib.md5(data).hexdigest(), write
        assert sha512.hexdigest() == hashlib.sha512(data).hexdigest(), write
        assert data == plain.read_bytes().replace(b"unhash.vmdk", b"hashed.vmdk"), write
        assert qemu_img("compare", "-F", out_format, top, hashed).returncode == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"out_format": "vpc"},
        {"out_format": "vhdx", "options": {"subformat": "fixed"}},
        {"out_format": "raw", "sparse_size": 0},
        {"out_format": "qcow2", "options": {"extended_l2": "on"}},
        {"out_format": "qcow2", "backing": "base.qcow2", "backing_format": "qcow2"},
    ],
)
def test_convert_feeds_hashers_for_every_output(kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Every writer feeds hashers the file's bytes (formerly refused where the output
    was not written in file order: now every output comes from one emitter)."""
    top = make_chain(tmp_path, 2)
    out = tmp_path / "out"
    md5 = hashlib.md5()
    qcowlib.convert(str(top), str(out), hashers=[md5], **kwargs)
    assert md5.hexdigest() == hashlib.md5(out.read_bytes()).hexdigest()
    fmt = kwargs["out_format"]
    assert qemu_img("compare", "-F", fmt, top, out).returncode == 0


def test_flatten_to_stdout_equals_file(tmp_path: Path) -> None:
    top = make_chain(tmp_path, 3)
    flatten(str(top), str(tmp_path / "f.qcow2"))
    res = subprocess.run(
        [sys.executable, "-m", "qcowlib", "flatten", str(top), "-"], capture_output=True, check=True
    )
    assert res.stdout == (tmp_path / "f.qcow2").read_bytes()


def test_flatten_refuses_glance_unsafe_options(tmp_path: Path) -> None:
    top = make_chain(tmp_path, 2)
    with pytest.raises(qcowlib.InvalidArgument, match="extended L2"):
        flatten(str(top), str(tmp_path / "x.qcow2"), options={"extended_l2": "on"})
    with pytest.raises(qcowlib.InvalidArgument, match="backing"):
        flatten(
            str(top), str(tmp_path / "x.qcow2"), options={"backing_file": "a", "backing_fmt": "raw"}
        )
    assert not (tmp_path / "x.qcow2").exists()


@pytest.mark.parametrize(
    ("out_format", "options"),
    [("qcow2", {}), ("vdi", {}), ("vmdk", {"subformat": "monolithicSparse"})],
)
def test_stream_refuses_a_source_changed_after_planning(
    out_format: str, options: dict[str, str], tmp_path: Path
) -> None:
    """Data planned as a cluster that reads back as zeros when emitted stops the stream."""
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.truncate(8 << 20)
        f.write(b"\x11" * (1 << 20))
        f.seek(4 << 20)
        f.write(b"\x22" * (1 << 20))
    stream = flatten_stream(str(src), out_format, options=options)
    with src.open("r+b") as f:
        f.seek(4 << 20)
        f.write(bytes(1 << 20))
    with pytest.raises(qcowlib.SourceChanged, match="source changed"):
        b"".join(stream)


def test_stream_memory_is_bounded(tmp_path: Path) -> None:
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64G")
    io(img, "qcow2", "write -P 1 0 64M", "write -P 2 40G 64M", "write -P 3 63G 16M")
    code = textwrap.dedent(
        f"""
        import re
        from qcowlib.ops.flatten import flatten_stream
        s = flatten_stream({str(img)!r})
        n = sum(len(c) for c in s)
        assert n == s.size, (n, s.size)
        hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        print(hwm // 1024)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(res.stdout.strip()) < 160, res.stdout  # MiB: independent of the 64 GiB size


@st.composite
def _disks(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int]], dict[str, str]]:
    size = draw(st.integers(1, 6 << 20))
    runs = draw(
        st.lists(
            st.tuples(st.integers(0, size - 1), st.integers(1, 1 << 20), st.integers(0, 4)),
            max_size=6,
        )
    )
    opts = {
        "cluster_size": str(draw(st.sampled_from([512, 4096, 65536, 1 << 21]))),
        "refcount_bits": str(draw(st.sampled_from([1, 16, 64]))),
    }
    if opts["refcount_bits"] == "16" and draw(st.booleans()):
        opts["compat"] = "0.10"
    return size, runs, opts


@given(_disks(), st.booleans())
@example((3 << 20, [(0, 1 << 20, 0), (2 << 20, 4096, 1)], {"cluster_size": "512"}), False)
@example((3 << 20, [(0, 1 << 20, 4), (2 << 20, 70000, 1)], {"cluster_size": "4096"}), True)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_one_pass_file_equals_stream(
    tmp_path: Path, disk: tuple[int, list[tuple[int, int, int]], dict[str, str]], compress: bool
) -> None:
    """flatten to a file (one read pass) writes exactly the stream's bytes (two passes),
    also where allocated data is all zeros (L2 tables planned, nothing stored) and,
    compressed, where clusters do not shrink (stored uncompressed among packed ones)."""
    size, runs, opts = disk
    noise = random.Random(size).randbytes(1 << 20)
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.truncate(size)
        for start, length, kind in runs:
            n = min(length, size - start)
            # kind 0: allocated zeros (data in the file system, zeros to the classifier)
            f.seek(start)
            # kind 4: incompressible bytes
            f.write(bytes(n) if kind == 0 else noise[:n] if kind == 4 else bytes([kind * 0x41]) * n)
    out = tmp_path / "flat.qcow2"
    flatten(str(src), str(out), src_format="raw", options=opts, compress=compress)
    with flatten_stream(str(src), src_format="raw", options=opts, compress=compress) as stream:
        streamed = b"".join(stream)
        assert len(streamed) == stream.size
    assert streamed == out.read_bytes()
    assert qemu_img("check", out, check=False).returncode == 0
    assert qemu_img("compare", "-f", "raw", src, out).returncode == 0


@pytest.mark.parametrize(
    ("out_format", "options", "compress"),
    [
        ("vmdk", {}, False),
        ("vmdk", {"subformat": "streamOptimized"}, False),
        ("vmdk", {"subformat": "streamOptimized", "adapter_type": "lsilogic"}, True),
        ("vdi", {}, False),
        ("vdi", {"static": "on"}, False),
    ],
)
@pytest.mark.usefixtures("fixed_ids")
def test_flatten_to_vmdk_and_vdi(
    out_format: str, options: dict[str, str], compress: bool, tmp_path: Path
) -> None:
    """A 3-deep chain flattened to VMDK and VDI: equal to the chain, clean, no parent;
    the stream is the file's bytes (with the image identifiers held fixed)."""
    top = make_chain(tmp_path, 3)
    out = tmp_path / f"flat.{out_format}"
    flatten(str(top), str(out), out_format, options=options, compress=compress)
    assert qemu_img("check", out, check=False).returncode == 0
    assert qemu_img("compare", "-F", out_format, top, out).returncode == 0
    info = qemu_json("info", out)
    assert info["format"] == out_format and "backing-filename" not in info
    if out_format == "vmdk":
        want = options.get("subformat", "monolithicSparse")
        assert info["format-specific"]["data"]["create-type"] == want
    with flatten_stream(
        str(top), out_format, options=options, compress=compress, name=out.name
    ) as stream:
        data = b"".join(stream.chunks())
        assert len(data) == stream.size
    assert data == out.read_bytes()
    res = subprocess.run(
        [sys.executable, "-m", "qcowlib", "flatten", "-O", out_format, str(top), "-"],
        capture_output=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    piped = tmp_path / f"piped.{out_format}"
    piped.write_bytes(res.stdout)
    assert qemu_img("compare", "-F", out_format, top, piped).returncode == 0
