"""VMDK outputs of several files (monolithicFlat, twoGbMaxExtentFlat/Sparse) from
``convert``, ``flatten`` and ``create``, against qemu-img: the extent names it gives,
``check``, ``compare`` with the source, ``info`` JSON."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, qemu_img, qemu_json, seeded_raw

pytestmark = pytest.mark.usefixtures("qemu")

SPLIT = ["monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse"]


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in ("cid", "actual-size")}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        name = os.path.basename(value)
        for stem in ("ours", "ref", "new"):
            name = name.replace(stem, "X")
        return name
    return value


def _files(directory: Path, stem: str) -> list[str]:
    return sorted(p.name.replace(stem, "X") for p in directory.iterdir() if p.name.startswith(stem))


@pytest.mark.parametrize("subformat", SPLIT)
def test_convert_split_as_qemu_img(subformat: str, tmp_path: Path) -> None:
    """A disk over 2 GiB (sparse source): every extent, its name and content."""
    src = tmp_path / "src.raw"
    seeded_raw(src, (5 << 30) + 3 * 512, seed=5)
    with src.open("r+b") as f:  # data across the 2 GiB extent boundary
        f.seek((2 << 30) - 4096)
        f.write(os.urandom(8192))
    opts = f"subformat={subformat}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours, ref = tmp_path / "a" / "ours.vmdk", tmp_path / "b" / "ref.vmdk"
    res = cli("convert", "-f", "raw", "-O", "vmdk", "-o", opts, src, ours)
    assert res.returncode == 0, res.stderr
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", opts, src, ref)
    assert _files(ours.parent, "ours") == _files(ref.parent, "ref")
    assert not [p for p in ours.parent.iterdir() if "tmp" in p.name]
    assert _scrub(qemu_json("info", ours)) == _scrub(qemu_json("info", ref))
    assert qemu_img("check", ours, check=False).returncode == 0
    assert qemu_img("compare", "-F", "raw", ours, src, check=False).returncode == 0
    assert cli("compare", "-F", "raw", ours, src).returncode == 0


@pytest.mark.parametrize("subformat", SPLIT)
def test_flatten_and_create_split(subformat: str, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "20M")
    qemu_img("convert", "-O", "qcow2", seeded_raw(tmp_path / "s.raw", 20 << 20, 3), base)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    out = tmp_path / "flat.vmdk"
    res = cli("flatten", "-O", "vmdk", "-o", f"subformat={subformat}", top, out)
    assert res.returncode == 0, res.stderr
    assert qemu_img("check", out, check=False).returncode == 0
    assert qemu_img("compare", top, out, check=False).returncode == 0
    new, ref = tmp_path / "new.vmdk", tmp_path / "ref.vmdk"
    res = cli("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", new, "3G")
    assert res.returncode == 0, res.stderr
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", ref, "3G")
    assert _files(tmp_path, "new") == _files(tmp_path, "ref")
    for a, b in zip(sorted(tmp_path.glob("new*")), sorted(tmp_path.glob("ref*")), strict=True):
        # extents as large as qemu-img's; the descriptors differ by the names in them
        assert a.name == "new.vmdk" or a.stat().st_size == b.stat().st_size
    assert _scrub(qemu_json("info", new)) == _scrub(qemu_json("info", ref))
    assert qemu_img("check", new, check=False).returncode == 0
    assert qemu_img("compare", new, ref, check=False).returncode == 0


def test_split_refusals(tmp_path: Path) -> None:
    """No stream of several files; a failed write leaves no file, not even an extent."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\1" * (1 << 20))
    res = cli("flatten", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", src, "-")
    assert res.returncode == 1 and "several files" in res.stderr
    # an extent name that is the source: refused before anything is written
    victim = tmp_path / "out-flat.vmdk"
    victim.write_bytes(b"keep")
    out = tmp_path / "out.vmdk"
    res = cli("convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", victim, out)
    assert res.returncode == 1 and "same file" in res.stderr
    assert victim.read_bytes() == b"keep" and not (tmp_path / "out.vmdk").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-flat.vmdk", "src.raw"]
