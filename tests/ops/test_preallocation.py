"""``-o preallocation=off|metadata|falloc|full`` for qcow2 and raw, in ``convert`` and
``create``, against qemu-img running the same command: ``info`` and ``map`` JSON, the
content (``compare``), ``check``, and the blocks ``du`` counts (``st_blocks``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, qemu_img, qemu_json, seeded_raw

pytestmark = pytest.mark.usefixtures("qemu")

MODES = {"qcow2": ["off", "metadata", "falloc", "full"], "raw": ["off", "falloc", "full"]}
CASES = [(fmt, mode) for fmt, modes in MODES.items() for mode in modes]
SIZE = 6 << 20


def _scrub(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("filename", "actual-size")}


def _blocks_close(ours: Path, ref: Path) -> None:
    """Allocation as qemu-img's: within 10% and 256 KiB (file systems place metadata
    blocks and QEMU's last-cluster writes differently)."""
    a, b = ours.stat().st_blocks * 512, ref.stat().st_blocks * 512
    assert abs(a - b) <= b // 10 + (256 << 10), (a, b)


def _same_as_qemu(fmt: str, ours: Path, ref: Path) -> None:
    os.sync()  # ext4 reports unwritten extents with dirty pages as data
    assert ours.stat().st_size == ref.stat().st_size
    assert _scrub(qemu_json("info", "-f", fmt, ours)) == _scrub(qemu_json("info", "-f", fmt, ref))
    assert qemu_json("map", "-f", fmt, ours) == qemu_json("map", "-f", fmt, ref)
    _blocks_close(ours, ref)
    if fmt == "qcow2":
        assert qemu_img("check", ours, check=False).returncode == 0


@pytest.mark.parametrize(("fmt", "mode"), CASES)
def test_convert_preallocation(fmt: str, mode: str, tmp_path: Path) -> None:
    src = seeded_raw(tmp_path / "src.raw", SIZE, seed=12)
    ours, ref = tmp_path / f"ours.{fmt}", tmp_path / f"ref.{fmt}"
    opts = f"preallocation={mode}"
    qemu_img("convert", "-f", "raw", "-O", fmt, "-o", opts, src, ref)
    res = cli("convert", "-f", "raw", "-O", fmt, "-o", opts, src, ours)
    assert res.returncode == 0, res.stderr
    assert qemu_img("compare", "-F", "raw", "-f", fmt, ours, src, check=False).returncode == 0
    _same_as_qemu(fmt, ours, ref)


@pytest.mark.parametrize(("fmt", "mode"), CASES)
def test_create_preallocation(fmt: str, mode: str, tmp_path: Path) -> None:
    ours, ref = tmp_path / f"ours.{fmt}", tmp_path / f"ref.{fmt}"
    opts = f"preallocation={mode}"
    qemu_img("create", "-q", "-f", fmt, "-o", opts, ref, "5M")
    res = cli("create", "-q", "-f", fmt, "-o", opts, ours, "5M")
    assert res.returncode == 0, res.stderr
    _same_as_qemu(fmt, ours, ref)


@pytest.mark.parametrize(
    ("fmt", "args", "words"),
    [
        ("raw", ["-o", "preallocation=metadata"], "metadata"),
        ("raw", ["-o", "preallocation=sometimes"], "preallocation"),
        ("qcow2", ["-c", "-o", "preallocation=metadata"], "Compression and preallocation"),
        ("qcow2", ["-o", "preallocation=sometimes"], "preallocation"),
    ],
)
def test_convert_preallocation_refusals(
    fmt: str, args: list[str], words: str, tmp_path: Path
) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(1 << 20))
    out = tmp_path / "out"
    assert qemu_img("convert", "-O", fmt, *args, src, out, check=False).returncode == 1
    out.unlink(missing_ok=True)
    res = cli("convert", "-O", fmt, *args, src, out)
    assert res.returncode == 1 and words in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
