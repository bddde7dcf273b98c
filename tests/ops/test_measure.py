"""``measure`` against ``qemu-img measure``: every fixture, many ``-o`` combinations, raw
output, ``--size`` without a source, human text, and the refusals."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import qcowlib
from qcowlib.cli import main as cli_main
from qcowlib.core.measure import allocated_clusters, allocated_units
from qcowlib.formats.opener import open_disk
from qcowlib.formats.qcow2.measure import calc_prealloc_size
from qcowlib.ops.measure import measure
from tests.conftest import have_qemu, qemu_img
from tests.fixtures.generate import Fixture

pytestmark = pytest.mark.usefixtures("qemu")

if have_qemu():
    from tests.fixtures.generate import ensure_fixtures

    FIXTURES = ensure_fixtures()
    NAMES = sorted(FIXTURES)
else:  # pragma: no cover - conftest's require_qemu decides skip or fail
    FIXTURES = {}
    NAMES = ["<qemu-img missing>"]

#: ``-o`` options for qcow2 output (each is one qemu-img ``-o`` argument).
QCOW2_OPTIONS = [
    "",
    "cluster_size=512",
    "cluster_size=64k",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=16",
    "refcount_bits=64",
    "compat=0.10",
    "extended_l2=on",
    "preallocation=metadata",
    "compression_type=zstd",
    "preallocation=full",
    "preallocation=falloc",
    "backing_file=base.qcow2,backing_fmt=qcow2",
    "extended_l2=on,cluster_size=2M,refcount_bits=64",
    "compat=0.10,cluster_size=512,lazy_refcounts=on",
    "cluster_size=4k,refcount_bits=2,extended_l2=off",
]


def ours(*args: str | Path) -> tuple[int, str, str]:
    """Run our CLI in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def theirs(*args: str | Path) -> tuple[int, str]:
    res = qemu_img(*args, check=False)
    return res.returncode, res.stdout


def both_succeed(*args: str | Path) -> str:
    """Run ``measure ARGS`` with both tools, assert the same success and stdout text."""
    status, out, err = ours("measure", *args)
    ref_status, ref_out = theirs("measure", *args)
    assert ref_status == 0, f"qemu-img refused {args}"
    assert (status, out, err) == (0, ref_out, "")
    return out


def _fixture(name: str) -> Any:
    if name not in FIXTURES:
        from tests.conftest import require_qemu

        require_qemu()
    return FIXTURES[name]


def _o(options: str) -> list[str]:
    return ["-o", options] if options else []


# -- every fixture ------------------------------------------------------------------------


@pytest.mark.parametrize("options", QCOW2_OPTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_qcow2_json_equals_qemu(name: str, options: str) -> None:
    fx = _fixture(name)
    text = both_succeed("--output=json", "-O", "qcow2", *_o(options), fx.path)
    assert set(json.loads(text)) <= {"required", "fully-allocated", "bitmaps"}


@pytest.mark.parametrize("name", NAMES)
def test_raw_output_equals_qemu(name: str) -> None:
    fx = _fixture(name)
    both_succeed("--output=json", "-O", "raw", fx.path)
    both_succeed(fx.path)  # qemu-img's default output format is raw


@pytest.mark.parametrize("name", NAMES)
def test_human_output_equals_qemu(name: str) -> None:
    fx = _fixture(name)
    text = both_succeed("-O", "qcow2", "-f", fx.fmt, fx.path)
    assert text.startswith("required size: ")


def test_bitmaps_key_follows_qemu() -> None:
    """Shown for a v3 qcow2 source into compat 1.1 output; absent otherwise."""
    bitmaps = _fixture("bitmaps").path
    with_bitmaps = json.loads(both_succeed("--output=json", "-O", "qcow2", bitmaps))
    assert with_bitmaps["bitmaps"] > 0
    assert "bitmaps size: " in both_succeed("-O", "qcow2", bitmaps)
    v2 = json.loads(both_succeed("--output=json", "-O", "qcow2", "-o", "compat=0.10", bitmaps))
    assert "bitmaps" not in v2
    raw_src = json.loads(both_succeed("--output=json", "-O", "qcow2", _fixture("raw-full").path))
    assert "bitmaps" not in raw_src


def test_api_matches_cli() -> None:
    fx = _fixture("c64k-v3-el2-backing")
    ref = json.loads(
        theirs("measure", "--output=json", "-O", "qcow2", "-o", "cluster_size=4k", fx.path)[1]
    )
    assert measure(str(fx.path), "qcow2", {"cluster_size": "4k"}) == ref
    assert measure(str(fx.path), "qcow2", {"cluster_size": "4k"}, src_format="qcow2") == ref


# -- images made for the purpose ------------------------------------------------------------


def _io(path: Path, fmt: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


MADE: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    # Data runs that start and end inside clusters, with zeros between them.
    "unaligned runs": (
        "qcow2",
        "4M",
        "cluster_size=4k",
        (
            "write -P 1 1000 3000",
            "write -P 2 70000 1",
            "write -z 8192 8192",
            "write -P 3 3000000 200000",
        ),
    ),
    "zeroed data": ("qcow2", "2M", "", ("write -P 1 0 1M", "write -z 64k 512k")),
    "compressed": ("qcow2", "2M", "", ("write -c -P 5 0 64k", "write -c -P 6 1M 64k")),
    "empty": ("qcow2", "1G", "", ()),
    "zero size qcow2": ("qcow2", "0", "", ()),
    "zero size raw": ("raw", "0", "", ()),
    "raw tail": ("raw", "1000001", "", ("write -P 7 999000 1001",)),
}


@pytest.mark.parametrize("case", list(MADE))
def test_made_images(case: str, tmp_path: Path) -> None:
    fmt, size, create_opts, cmds = MADE[case]
    img = tmp_path / f"img.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *_o(create_opts), img, size)
    if cmds:
        _io(img, fmt, *cmds)
    for options in ("", "cluster_size=512", "cluster_size=2M", "extended_l2=on"):
        both_succeed("--output=json", "-O", "qcow2", *_o(options), img)
    both_succeed("-O", "raw", img)


def test_overlay_counts_backing_data(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    _io(base, "qcow2", "write -P 1 0 1M", "write -P 2 6M 100")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "10M")
    _io(top, "qcow2", "write -z 0 512k", "write -P 3 9M 4k")
    for options in ("", "cluster_size=512", "backing_file=x"):
        both_succeed("--output=json", "-O", "qcow2", *_o(options), top)


# -- --size without a source -------------------------------------------------------------------

SIZES = ["0", "1", "1000", "512", "64k", "1M", "1.5G", "10G", "1T", "100T"]
SIZE_OPTIONS = [
    "",
    "cluster_size=512",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=64",
    "extended_l2=on",
    "compat=0.10",
    "preallocation=metadata",
    "preallocation=full",
]


@pytest.mark.parametrize("options", SIZE_OPTIONS)
@pytest.mark.parametrize("size", SIZES)
def test_size_without_source(size: str, options: str) -> None:
    args = ["--size", size, "-O", "qcow2", *_o(options)]
    if theirs("measure", *args)[0] != 0:  # e.g. 100T with 512-byte clusters
        assert_refused_like_qemu(*args)
        return
    both_succeed("--output=json", *args)
    both_succeed(*args)


@pytest.mark.parametrize("size", SIZES)
def test_size_raw(size: str) -> None:
    both_succeed("--output=json", "--size", size, "-O", "raw")
    both_succeed("--size", size)


def test_size_option_and_flag() -> None:
    both_succeed("--size", "1G", "-O", "qcow2", "-o", "size=5G")
    both_succeed("--size", "1k", "-o", "size=2k")
    assert measure(None, "qcow2", {"size": "5G"}, size=1 << 30) == measure(
        None, "qcow2", size=1 << 30
    )


def test_option_spellings_qemu_accepts() -> None:
    for options in (
        "lazy_refcounts=yes",
        "extended_l2",
        "extended_l2=true",
        "refcount_bits=0x10",
        "cluster_size=0x1000",
        "cluster_size=4096b",
        "compression_type=whatever",
        "nocow=on,extent_size_hint=1M",
        "data_file=x,data_file_raw=on",
        "encrypt.format=aes",
        "backing_file=",
        "compat=0.10,extended_l2=on",
    ):
        both_succeed("--size", "1G", "-O", "qcow2", "-o", options)
    both_succeed("--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k", "-o", "refcount_bits=1")
    both_succeed("--size", "1G", "-O", "raw", "-o", "preallocation=bogus")


# -- refusals ------------------------------------------------------------------------------


def assert_refused_like_qemu(*args: str | Path) -> None:
    status, out, err = ours("measure", *args)
    ref_status, _ = theirs("measure", *args)
    assert ref_status == 1, f"qemu-img accepted {args}"
    assert status == 1
    assert out == ""
    assert err.startswith("qcowlib: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


BAD_ARGS = [
    ("-O", "qcow2"),
    ("--size", "1G", "-f", "qcow2"),
    ("--size", "1G", "-O", "qcow2", "-o", "compat=v3"),
    ("--size", "1G", "-O", "qcow2", "-o", "compat=2"),
    ("--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=1"),
    ("--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"),
    ("--size", "1G", "-O", "qcow2", "-o", "refcount_bits=0"),
    ("--size", "1G", "-O", "qcow2", "-o", "refcount_bits=128"),
    ("--size", "1G", "-O", "qcow2", "-o", "refcount_bits=abc"),
    ("--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"),
    ("--size", "1G", "-O", "qcow2", "-o", "cluster_size=4M"),
    ("--size", "1G", "-O", "qcow2", "-o", "cluster_size=256"),
    ("--size", "1G", "-O", "qcow2", "-o", "cluster_size="),
    ("--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on"),
    ("--size", "1G", "-O", "qcow2", "-o", "preallocation=foo"),
    ("--size", "1G", "-O", "qcow2", "-o", "foo=bar"),
    ("--size", "1G", "-O", "qcow2", "-o", "lazy_refcounts=maybe"),
    ("--size", "1G", "-O", "qcow2", "-o", "lazy_refcounts=ON"),
    ("--size", "1G", "-O", "qcow2", "-o", "size=abc"),
    ("--size", "1G", "-O", "qcow2", "-o", ""),
    ("--size", "1G", "-O", "qcow2", "-o", ","),
    ("--size", "1P", "-O", "qcow2", "-o", "cluster_size=512"),
    ("--size", "1G", "-O", "raw", "-o", "cluster_size=64k"),
    ("--size", "1G", "-O", "vmdk"),
    ("--size", "1G", "-O", "vdi"),
    ("--size", "1G", "-O", "vhdx"),
    ("--size", "1G", "-O", "dmg"),
    ("--size", "1G", "-O", "foo"),
    ("--size", "-1", "-O", "qcow2"),
    ("--size", "abc", "-O", "qcow2"),
    ("--size", "9E", "-O", "qcow2"),
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=" ".join)
def test_bad_arguments(args: tuple[str, ...]) -> None:
    assert_refused_like_qemu(*args)


def assert_refused(*args: str | Path) -> None:
    status, out, err = ours("measure", *args)
    assert (status, out) == (1, "")
    assert err.startswith("qcowlib: error: ") and err.count("\n") == 1, err


def test_bad_sources(tmp_path: Path) -> None:
    good = _fixture("c64k-v3-rc16").path
    assert_refused_like_qemu("-O", "qcow2", tmp_path / "missing.qcow2")
    assert_refused_like_qemu("--size", "1G", "-O", "qcow2", good)
    assert_refused_like_qemu("-f", "qcow2", "-O", "qcow2", _fixture("raw-full").path)
    assert_refused_like_qemu("-O", "qcow2", tmp_path)  # a directory
    # qemu-img probes a qcow2 magic with version 0 as raw, and so do we.
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + bytes(100))
    both_succeed("-O", "qcow2", junk)
    # A truncated image: qemu-img reads zeros past the end of the file; we refuse it.
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(good.read_bytes()[:4096])
    assert_refused("-O", "qcow2", broken)
    assert_refused("-O", "raw", broken)


def test_usage_errors_are_status_2() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "qcowlib", "measure", "--output=xml", "--size", "1G"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


def test_api_errors_derive_from_root() -> None:
    with pytest.raises(qcowlib.InvalidArgument):
        measure(None)
    with pytest.raises(qcowlib.InvalidArgument):
        measure("x", size=1)
    with pytest.raises(qcowlib.InvalidArgument):
        measure(None, size=1, src_format="qcow2")
    with pytest.raises(qcowlib.InvalidArgument):
        measure(None, size=-1)
    with pytest.raises(qcowlib.UnsupportedFeature):
        measure(None, "vmdk", size=1)
    with pytest.raises(qcowlib.UnsupportedFeature):
        measure(None, "qcow2", {"encrypt.format": "luks"}, size=1)
    with pytest.raises(qcowlib.QcowlibError):
        measure(None, "qcow2", {"cluster_size": "3k"}, size=1)


# -- arithmetic ------------------------------------------------------------------------------


def test_prealloc_size_small_cases() -> None:
    # header + refcount table + refcount block: an empty 64k-cluster image.
    assert calc_prealloc_size(0, 65536, 4, False) == 3 * 65536
    # one data cluster adds an L2 table, an L1 cluster and the data itself.
    assert calc_prealloc_size(1000, 65536, 4, False) == 6 * 65536


def test_allocated_clusters_unions_touched_clusters() -> None:
    from qcowlib.core.disk import Extent, ExtentKind

    data, zero = ExtentKind.DATA, ExtentKind.ZERO
    runs = [
        Extent(0, 100, data),
        Extent(100, 50, zero),
        Extent(150, 10, data),  # same cluster as the first run
        Extent(160, 1000, zero),
        Extent(1160, 1000, data, hole=True),  # reads as zero: not counted
        Extent(2160, 2000, ExtentKind.COMPRESSED),
        Extent(4160, 100, ExtentKind.UNALLOCATED),
    ]
    # 512-byte clusters: [0,512) and [2048, 4608) -> 1 + 5.
    assert allocated_clusters(runs, 512) == 6


def test_allocated_units_counts_as_the_extent_walk(fixtures: dict[str, Fixture]) -> None:
    """The run-array count used by measure equals the per-extent walk qemu-img's rule
    is written against, on every fixture (chains, compressed, zero and discarded
    clusters, other formats) and for several cluster sizes."""
    for name, fx in fixtures.items():
        with open_disk(str(fx.path)) as disk:
            for cs in (512, 65536, 2 << 20):
                expected = allocated_clusters(disk.extents(), cs)
                assert allocated_units(disk, cs) == expected, (name, cs)
