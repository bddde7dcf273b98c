"""``create -f vmdk|vdi|vpc|vhdx``: the format's one writer over an empty disk, against
``qemu-img create`` with the same options (info and map JSON, the "Formatting" line,
check, compare with a zero raw image)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")

#: Keys whose values are drawn at random (or name the file) in every new image.
_RANDOM = {"cid", "filename", "actual-size", "full-backing-filename"}
SIZE = "10000k"  # not CHS-exact: vpc create rounds it up to a geometry

CASES = [
    ("vmdk", ""),
    ("vmdk", "subformat=streamOptimized,adapter_type=lsilogic"),
    ("vmdk", "zeroed_grain=on,compat6=on,toolsversion=123"),
    ("vmdk", "hwversion=7,adapter_type=buslogic"),
    ("vdi", ""),
    ("vdi", "static=on"),
    ("vpc", ""),
    ("vpc", "subformat=fixed"),
    ("vpc", "subformat=fixed,force_size=on"),
    ("vpc", "force_size=on"),
    ("vhdx", ""),
    ("vhdx", "subformat=fixed"),
    ("vhdx", "block_size=1M,log_size=2M,block_state_zero=off"),
    ("vhdx", "block_size=32M,block_state_zero=on"),
    ("vhdx", "block_size=512M,log_size=1500k"),
    ("vhdx", "block_size=3500k,log_size=100k"),
]


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in _RANDOM}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _create(tool: str, fmt: str, opts: str, path: Path, size: str = SIZE) -> str:
    args: list[str | Path] = ["create", "-f", fmt, *(["-o", opts] if opts else []), path, size]
    if tool == "qemu":
        return qemu_img(*args).stdout
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize(("fmt", "opts"), CASES)
def test_create_as_qemu_img(fmt: str, opts: str, tmp_path: Path) -> None:
    ref, ours = tmp_path / f"ref.{fmt}", tmp_path / f"ours.{fmt}"
    ref_line = _create("qemu", fmt, opts, ref)
    our_line = _create("ours", fmt, opts, ours)
    assert our_line.replace(str(ours), "X") == ref_line.replace(str(ref), "X")
    assert _scrub(qemu_json("info", "-f", fmt, ours)) == _scrub(qemu_json("info", "-f", fmt, ref))
    assert qemu_json("map", "-f", fmt, ours) == qemu_json("map", "-f", fmt, ref)
    assert ours.stat().st_size == ref.stat().st_size or "streamOptimized" in opts
    check = qemu_img("check", "-f", fmt, ours, check=False)
    assert check.returncode in (0, 63), check.stdout + check.stderr  # 63: vpc has no check
    zero = tmp_path / "zero.raw"
    with zero.open("wb") as f:
        f.truncate(qemu_json("info", "-f", fmt, ours)["virtual-size"])
    assert qemu_img("compare", "-f", fmt, "-F", "raw", ours, zero, check=False).returncode == 0
    # and qcowlib reads back the same (an empty disk)
    res = cli("compare", "-f", fmt, "-F", fmt, ours, ref)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("fmt", "opts", "words"),
    [
        ("vmdk", "compat6=on,hwversion=7", "compat6"),
        ("vmdk", "adapter_type=scsi", "adapter type"),
        ("vmdk", "subformat=sparse", "subformat"),
        ("vdi", "static=maybe", "static"),
        ("vpc", "subformat=dynamic2", "subformat"),
        ("vhdx", "block_size=3M", "Block size"),
        ("vhdx", "block_size=3M", "power of two"),
        ("vdi", "static=on,size=1M", "only once"),
        ("vdi", "cluster_size=64k", "cluster_size"),
    ],
)
def test_create_refusals(fmt: str, opts: str, words: str, tmp_path: Path) -> None:
    """qemu-img refuses the same options; we say why in one line, exit 1, no file."""
    path = tmp_path / f"x.{fmt}"
    assert qemu_img("create", "-f", fmt, "-o", opts, path, "10M", check=False).returncode == 1
    path.unlink(missing_ok=True)
    res = cli("create", "-f", fmt, "-o", opts, path, "10M")
    assert res.returncode == 1 and words in res.stderr and "Traceback" not in res.stderr
    assert not path.exists()


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vpc", "vhdx"])
def test_create_size_and_help(fmt: str, tmp_path: Path) -> None:
    """The size from ``-o size=``, refused twice or missing; ``-o help`` from the registry."""
    ours, ref = tmp_path / f"ours.{fmt}", tmp_path / f"ref.{fmt}"
    assert cli("create", "-q", "-f", fmt, "-o", "size=3M", ours).returncode == 0
    qemu_img("create", "-q", "-f", fmt, "-o", "size=3M", ref)
    size = qemu_json("info", "-f", fmt, ours)["virtual-size"]
    assert size == qemu_json("info", "-f", fmt, ref)["virtual-size"]
    assert "only once" in cli("create", "-f", fmt, "-o", "size=3M", ours, "3M").stderr
    assert "size" in cli("create", "-f", fmt, ours).stderr
    res = cli("create", "-f", fmt, "-o", "help")
    assert res.returncode == 0
    ref_names = {
        line.split("=", 1)[0].strip()
        for line in qemu_img("create", "-f", fmt, "-o", "help").stdout.splitlines()
        if line.startswith("  ")
    }
    our_names = {line.split("=", 1)[0].strip() for line in res.stdout.splitlines()[1:]}
    # every option we list, qemu-img lists (VMDK backing files are not written yet)
    assert our_names <= ref_names and our_names >= ref_names - {"backing_file", "backing_fmt"}
