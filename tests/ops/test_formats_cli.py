"""VDI, VHD and VMDK through the command line, against qemu-img."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli, qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")


@pytest.mark.parametrize("static", ["off", "on"])
def test_vdi_info_map_and_convert(static: str, tmp_path: Path) -> None:
    img = tmp_path / "disk.vdi"
    qemu_img("create", "-q", "-f", "vdi", "-o", f"static={static}", img, "20M")
    subprocess.run(
        ["qemu-io", "-f", "vdi", "-c", "write -P 7 0 1500k", "-c", "write -P 9 9M 300k", str(img)],
        check=True,
        capture_output=True,
    )
    res = cli("info", "--output=json", img)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == qemu_json("info", img)
    res = cli("map", "--output=json", img)
    assert res.returncode == 0, res.stderr
    assert res.stdout == qemu_img("map", "--output=json", img).stdout
    # vdi -> qcow2 -> vdi keeps the content
    q = tmp_path / "d.qcow2"
    assert cli("convert", "-O", "qcow2", img, q).returncode == 0
    back = tmp_path / "back.vdi"
    res = cli("convert", "-O", "vdi", "-o", f"static={static}", q, back)
    assert res.returncode == 0, res.stderr
    assert qemu_img("check", back, check=False).returncode == 0
    assert qemu_img("compare", img, back).returncode == 0
    assert qemu_json("info", back)["format"] == "vdi"


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_vpc_info_and_convert(subformat: str, tmp_path: Path) -> None:
    img = tmp_path / "disk.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", img, "20M")
    subprocess.run(
        ["qemu-io", "-f", "vpc", "-c", "write -P 7 0 1500k", "-c", "write -P 9 9M 300k", str(img)],
        check=True,
        capture_output=True,
    )
    res = cli("info", "-f", "vpc", "--output=json", img)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == qemu_json("info", "-f", "vpc", img)
    q = tmp_path / "d.qcow2"
    assert cli("convert", "-f", "vpc", "-O", "qcow2", img, q).returncode == 0
    assert qemu_img("compare", "-f", "vpc", img, q).returncode == 0
    back = tmp_path / "back.vhd"
    res = cli("convert", "-O", "vpc", "-o", f"subformat={subformat}", q, back)
    assert res.returncode == 0, res.stderr
    assert qemu_img("compare", "-F", "vpc", q, back).returncode == 0
    assert (
        qemu_json("info", "-f", "vpc", back)["virtual-size"] == qemu_json("info", q)["virtual-size"]
    )


@pytest.mark.parametrize(
    "subformat", ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "streamOptimized"]
)
def test_vmdk_info_and_convert(
    subformat: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "src.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "20M")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 7 0 1500k", "-c", "write -P 9 9M 300k", str(raw)],
        check=True,
        capture_output=True,
    )
    img = tmp_path / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, img)
    monkeypatch.chdir(tmp_path)
    res = cli("info", "--output=json", "disk.vmdk")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == qemu_json("info", "disk.vmdk")
    assert cli("compare", img, raw).returncode == 0
    if subformat in ("monolithicSparse", "streamOptimized"):
        out = tmp_path / "ours.vmdk"
        res = cli("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, out)
        assert res.returncode == 0, res.stderr
        assert qemu_img("check", out, check=False).returncode == 0
        assert qemu_img("compare", "-f", "raw", raw, out).returncode == 0
        got = qemu_json("info", out)["format-specific"]["data"]["create-type"]
        assert got == subformat


def test_vmdk_delta_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VMDK delta disk: info --backing-chain and map as qemu-img, flattened by convert."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "vmdk", "base.vmdk", "8M")
    io = ["qemu-io", "-f", "vmdk"]
    subprocess.run([*io, "-c", "write -P 1 0 3M", "base.vmdk"], check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "top.vmdk")
    subprocess.run([*io, "-c", "write -P 2 1M 128k", "top.vmdk"], check=True, capture_output=True)
    for args in (["info", "--backing-chain"], ["info"], ["map"]):
        res = cli(*args, "--output=json", "top.vmdk")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == qemu_json(*args, "top.vmdk"), args
    assert cli("map", "top.vmdk").stdout == qemu_img("map", "top.vmdk").stdout
    res = cli("convert", "-O", "qcow2", "top.vmdk", "flat.qcow2")
    assert res.returncode == 0, res.stderr
    assert qemu_img("compare", "top.vmdk", "flat.qcow2").returncode == 0
    assert "backing-filename" not in qemu_json("info", "flat.qcow2")


def test_round_trip_through_all_formats(tmp_path: Path) -> None:
    raw = tmp_path / "start.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "12M")
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x31 4096 3M",
            "-c",
            "write -P 0x32 9M 200k",
            str(raw),
        ],
        check=True,
        capture_output=True,
    )
    steps = [
        ("qcow2", []),
        ("vmdk", ["-o", "subformat=streamOptimized"]),
        ("vdi", []),
        ("vpc", []),
        ("vhdx", []),
        ("vmdk", ["-o", "subformat=monolithicSparse"]),
        ("vhdx", ["-o", "subformat=fixed"]),
        ("vdi", ["-o", "static=on"]),
        ("vpc", ["-o", "subformat=fixed"]),
        ("raw", []),
    ]
    current, fmt = raw, "raw"
    for i, (out_fmt, opts) in enumerate(steps):
        nxt = tmp_path / f"step{i}.{out_fmt}"
        res = cli("convert", "-f", fmt, "-O", out_fmt, *opts, current, nxt)
        assert res.returncode == 0, (out_fmt, res.stderr)
        current, fmt = nxt, out_fmt
    assert current.read_bytes()[: 12 << 20] == raw.read_bytes()


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_vhdx_info_and_convert(subformat: str, tmp_path: Path) -> None:
    img = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", f"subformat={subformat}", img, "24M")
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "vhdx",
            "-c",
            "write -P 7 0 1500k",
            "-c",
            "write -P 9 17M 300k",
            str(img),
        ],
        check=True,
        capture_output=True,
    )
    res = cli("info", "--output=json", img)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == qemu_json("info", img)
    out = tmp_path / "ours.vhdx"
    res = cli("convert", "-O", "vhdx", "-o", f"subformat={subformat}", img, out)
    assert res.returncode == 0, res.stderr
    assert qemu_img("check", out, check=False).returncode == 0
    assert qemu_img("compare", img, out).returncode == 0


def test_vmdk_adapter_type_and_hwversion(tmp_path: Path) -> None:
    """``-o adapter_type=lsilogic,hwversion=6``: what ESXi imports ask for, as qemu-img writes."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"\x42" * (1 << 20) + bytes(1 << 20))
    ours, ref = tmp_path / "ours.vmdk", tmp_path / "ref.vmdk"
    opts = "subformat=streamOptimized,adapter_type=lsilogic,hwversion=6"
    res = cli("convert", "-f", "raw", "-O", "vmdk", "-o", opts, raw, ours)
    assert res.returncode == 0, res.stderr
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", opts, raw, ref)

    def ddb(path: Path) -> dict[str, str]:
        text = path.read_bytes()[512 : 21 * 512].split(b"\0", 1)[0].decode()
        pairs = (line.split("=", 1) for line in text.splitlines() if line.startswith("ddb."))
        return {k.strip(): v.strip().strip('"') for k, v in pairs}

    want = ddb(ref)
    assert want["ddb.adapterType"] == "lsilogic" and want["ddb.virtualHWVersion"] == "6"
    assert ddb(ours) == want
    assert qemu_img("compare", raw, ours).returncode == 0
    res = cli("convert", "-f", "raw", "-O", "vmdk", "-o", "adapter_type=scsi", raw, ours)
    assert res.returncode == 1 and "adapter type" in res.stderr
