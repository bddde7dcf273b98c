"""qcow2 output (create, convert -O qcow2) checked by qemu-img: check clean, compare equal,
and info reporting the options asked for."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import qcowlib
from qcowlib._units import parse_size
from tests.conftest import cli, have_qemu, qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")


def assert_clean(img: Path) -> dict[str, Any]:
    res = qemu_img("check", "--output=json", img, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    report: dict[str, Any] = json.loads(res.stdout)
    assert not report.get("corruptions") and not report.get("leaks")
    return report


def spec(img: Path) -> dict[str, Any]:
    info = qemu_json("info", img)
    data: dict[str, Any] = info["format-specific"]["data"]
    return {**data, "cluster-size": info["cluster-size"], "virtual-size": info["virtual-size"]}


CREATE_CASES = [
    *(
        {"cluster_size": str(cs), "compat": compat}
        for cs, compat in itertools.product([512, 4096, 65536, 2097152], ["0.10", "1.1"])
    ),
    *({"refcount_bits": str(b)} for b in (1, 2, 4, 8, 32, 64)),
    {"lazy_refcounts": "on"},
    {"extended_l2": "on"},
    {"extended_l2": "on", "cluster_size": "16k"},
    {"compression_type": "zstd"},
    {"preallocation": "metadata"},
    {"preallocation": "metadata", "cluster_size": "4k", "refcount_bits": "2"},
    {"preallocation": "falloc"},
    {"preallocation": "full"},
]


@pytest.mark.parametrize(
    "options", CREATE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_create_options(options: dict[str, str], tmp_path: Path) -> None:
    img = tmp_path / "new.qcow2"
    opt = ",".join(f"{k}={v}" for k, v in options.items())
    res = cli("create", "-q", "-f", "qcow2", "-o", opt, img, "100M")
    assert res.returncode == 0, res.stderr
    assert_clean(img)
    got = spec(img)
    assert got["virtual-size"] == 100 << 20
    if "cluster_size" in options:
        assert got["cluster-size"] == parse_size(options["cluster_size"])
    assert got["compat"] == options.get("compat", "1.1")
    assert got["refcount-bits"] == int(options.get("refcount_bits", 16))
    if got["compat"] == "1.1":
        assert got["lazy-refcounts"] == (options.get("lazy_refcounts") == "on")
        assert got["extended-l2"] == (options.get("extended_l2") == "on")
    assert got["compression-type"] == options.get("compression_type", "zlib")
    # reads back as zeros everywhere, like a qemu-img made image of the same size
    ref = tmp_path / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", ref, "100M")
    assert qemu_img("compare", img, ref, check=False).returncode == 0
    if options.get("preallocation") == "metadata":
        entries = qemu_json("map", img)
        assert all(e["data"] for e in entries)  # every cluster allocated


@pytest.mark.parametrize(
    "options",
    ["lazy_refcounts=y", "cluster_size=0x10000", "refcount_bits=0x10", "refcount_bits=010"],
)
def test_create_option_spellings_qemu_accepts(options: str, tmp_path: Path) -> None:
    """QemuOpts' value types: y/n booleans, hex sizes, base-0 numbers (010 is octal 8)."""
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    assert cli("create", "-q", "-f", "qcow2", "-o", options, ours, "1G").returncode == 0
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, ref, "1G")
    assert qemu_json("info", ours)["format-specific"] == qemu_json("info", ref)["format-specific"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("compat=0.10,refcount_bits=8", "compatibility level"),
        ("compat=0.10,lazy_refcounts=on", "Lazy refcounts"),
        ("extended_l2=on,cluster_size=4k", "16384"),
        ("cluster_size=1000", "power of two"),
        ("cluster_size=4M", "power of two"),
        ("refcount_bits=3", "power of two"),
        ("refcount_bits=128", "power of two"),
        ("compression_type=lz4", "compression_type"),
        ("compat=2.0", "compatibility level"),
        ("backing_fmt=raw", "without backing file"),
        ("nosuchoption=1", "nosuchoption"),
        ("lazy_refcounts=ON", "expects 'on' or 'off'"),
        ("refcount_bits=abc", "expects a number"),
        ("size=1G", "specified only once"),
    ],
)
def test_create_refusals(options: str, message: str, tmp_path: Path) -> None:
    img = tmp_path / "bad.qcow2"
    res = cli("create", "-f", "qcow2", "-o", options, img, "1G")
    assert res.returncode == 1, res.stdout
    assert res.stderr.startswith("qcowlib: error: ") and message in res.stderr
    assert "Traceback" not in res.stderr
    assert not img.exists()
    assert (
        qemu_img(
            "create", "-f", "qcow2", "-o", options, tmp_path / "q.qcow2", "1G", check=False
        ).returncode
        != 0
    )


def test_create_with_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "64M")
    subprocess.run(["qemu-io", "-c", "write -P 3 0 1M", str(base)], check=True, capture_output=True)
    top = tmp_path / "top.qcow2"
    res = cli("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    assert res.returncode == 0, res.stderr
    assert "backing_file=base.qcow2" in res.stdout
    info = qemu_json("info", top)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 64 << 20  # size taken from the backing file
    assert_clean(top)
    assert qemu_img("compare", top, base).returncode == 0
    # -b without -F is refused; -u allows a backing file that does not exist yet
    assert cli("create", "-f", "qcow2", "-b", "base.qcow2", tmp_path / "x.qcow2").returncode == 1
    res = cli(
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "later.qcow2",
        "-F",
        "qcow2",
        tmp_path / "u.qcow2",
        "1G",
    )
    assert res.returncode == 0, res.stderr
    assert qemu_json("info", tmp_path / "u.qcow2")["backing-filename"] == "later.qcow2"
    assert (
        cli(
            "create",
            "-f",
            "qcow2",
            "-b",
            "nothere.qcow2",
            "-F",
            "qcow2",
            tmp_path / "y.qcow2",
            "1G",
        ).returncode
        == 1
    )


def test_create_raw(tmp_path: Path) -> None:
    img = tmp_path / "r.raw"
    assert cli("create", "-q", "-f", "raw", img, "10M").returncode == 0
    assert img.stat().st_size == 10 << 20
    assert qemu_json("info", img)["format"] == "raw"


# -- convert -O qcow2 -----------------------------------------------------------------------

if have_qemu():
    from tests.fixtures.generate import ensure_fixtures

    FIXTURES = ensure_fixtures()
else:  # pragma: no cover
    FIXTURES = {}


@pytest.mark.parametrize("name", sorted(FIXTURES) or ["<qemu-img missing>"])
def test_convert_every_fixture_to_qcow2(name: str, tmp_path: Path) -> None:
    fx = FIXTURES[name]
    out = tmp_path / "out.qcow2"
    qcowlib.convert(str(fx.path), str(out), "qcow2")
    assert_clean(out)
    res = qemu_img("compare", "-f", fx.fmt, "-F", "qcow2", fx.path, out, check=False)
    assert res.returncode == 0, res.stdout
    assert "backing-filename" not in qemu_json("info", out)


CONVERT_CASES = [
    {},
    {"cluster_size": "512"},
    {"cluster_size": "2M"},
    {"compat": "0.10"},
    {"refcount_bits": "1"},
    {"refcount_bits": "64", "cluster_size": "4k"},
    {"extended_l2": "on"},
    {"lazy_refcounts": "on"},
    {"compression_type": "zstd"},
]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "options", CONVERT_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_convert_options(options: dict[str, str], compress: bool, tmp_path: Path) -> None:
    src = FIXTURES["chain3-raw-c4k-c64k"].path if FIXTURES else tmp_path
    out = tmp_path / "out.qcow2"
    args: list[str | Path] = ["convert", "-O", "qcow2"]
    if options:
        args += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
    if compress:
        args.append("-c")
    res = cli(*args, src, out)
    assert res.returncode == 0, res.stderr
    report = assert_clean(out)
    assert qemu_img("compare", src, out).returncode == 0
    got = spec(out)
    assert got["refcount-bits"] == int(options.get("refcount_bits", 16))
    assert got["compression-type"] == options.get("compression_type", "zlib")
    if compress:
        assert report.get("compressed-clusters", 0) > 0


def test_convert_with_backing_writes_only_differences(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "32M")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 8M", str(base)], check=True, capture_output=True)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    subprocess.run(
        ["qemu-io", "-c", "write -P 2 1M 64k", "-c", "write -z 4M 64k", str(top)],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "out.qcow2"
    res = cli("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", top, out)
    assert res.returncode == 0, res.stderr
    assert_clean(out)
    assert qemu_img("compare", top, out).returncode == 0
    assert qemu_json("info", out)["backing-filename"] == "base.qcow2"
    allocated = [e for e in qemu_json("map", out) if e["depth"] == 0 and e["present"]]
    assert sum(e["length"] for e in allocated) == 2 * 65536  # the data and the zeros
    assert (
        cli("convert", "-O", "qcow2", "-B", "base.qcow2", top, tmp_path / "n.qcow2").returncode == 1
    )


def test_convert_same_cluster_shared_by_compressed_data(tmp_path: Path) -> None:
    raw = tmp_path / "in.raw"
    raw.write_bytes(b"".join(bytes([i % 251]) * 4096 for i in range(1024)))
    for bits in ("1", "2", "16"):
        out = tmp_path / f"c{bits}.qcow2"
        res = cli(
            "convert", "-c", "-O", "qcow2", "-o", f"refcount_bits={bits},cluster_size=4k", raw, out
        )
        assert res.returncode == 0, res.stderr
        assert_clean(out)
        assert qemu_img("compare", "-f", "raw", raw, out).returncode == 0
