"""VDI through the command line: info/map JSON as qemu-img's, convert to and from VDI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcowlib", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


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
