"""Fragmented VMDK, VDI, VHD and VHDX images made by qemu-img/qemu-io, against the old
per-extent path and against qemu-img.

Each image gets hundreds of scattered writes of 512 B to 64 KiB.  Its vectorised
``layer_runs`` must equal the runs of ``layer_extents`` (the per-extent path, kept for
``map`` and partial reads) over the whole disk and over random windows; ``convert -O
raw`` must be byte-identical to ``qemu-img convert -O raw`` and ``map --output json``
identical to qemu-img's (VHDX excepted: qemu-img 7.2 has no block status for it and
reports one data run; there the zero runs must read as zeros in qemu-img's copy).
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

import qcowlib
from qcowlib.core.disk import Disk, runs_from_extents
from tests.conftest import cli, qemu_img, qemu_io

pytestmark = pytest.mark.usefixtures("qemu")

SIZE = 12 << 20
WRITES = 600

#: name -> (qemu-img format, create options); flat and static images are sparse files,
#: so their data runs are cut at holes.
IMAGES = {
    "vmdk-sparse": ("vmdk", ["-o", "subformat=monolithicSparse"]),
    "vmdk-2gb-sparse": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
    "vmdk-flat": ("vmdk", ["-o", "subformat=monolithicFlat"]),
    "vdi": ("vdi", []),
    "vdi-static": ("vdi", ["-o", "static=on"]),
    "vpc": ("vpc", ["-o", "subformat=dynamic,force_size=on"]),
    "vpc-fixed": ("vpc", ["-o", "subformat=fixed,force_size=on"]),
    "vhdx": ("vhdx", ["-o", "block_size=1M"]),
    "vhdx-fixed": ("vhdx", ["-o", "subformat=fixed,block_size=1M"]),
}


def _writes(seed: int) -> list[str]:
    rng = random.Random(seed)
    cmds = []
    for i in range(WRITES):
        n = 512 * min(128, int(2 ** rng.uniform(0, 7.01)))
        off = rng.randrange(0, (SIZE - n) // 512) * 512
        pattern = f"-P {1 + i % 255}" if i % 7 else "-z"
        cmds.append(f"write -q {pattern} {off} {n}")
    return cmds


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("frag-runs")
    out: dict[str, Path] = {}
    for name, (fmt, opts) in IMAGES.items():
        path = d / f"{name}.{fmt}"
        qemu_img("create", "-q", "-f", fmt, *opts, path, str(SIZE))
        qemu_io(path, fmt, *_writes(len(name)))
        out[name] = path
    stream = d / "vmdk-stream.vmdk"
    qemu_img("convert", "-q", "-O", "vmdk", "-o", "subformat=streamOptimized",
             out["vmdk-sparse"], stream)  # fmt: skip
    out["vmdk-stream"] = stream
    return out


NAMES = [*IMAGES, "vmdk-stream"]


def _fmt(name: str) -> str:
    return IMAGES[name][0] if name in IMAGES else "vmdk"


def qemu_raw(path: Path, fmt: str, tmp: Path) -> bytes:
    """qemu-img's copy (the format named: qemu-img probes a fixed VHD as raw)."""
    out = tmp / (path.name + ".ref.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    return out.read_bytes()


def assert_runs_like_extents(disk: Disk, start: int, end: int) -> None:
    """``layer_runs`` equals the runs of ``layer_extents`` over ``[start, end)``."""
    new = list(disk.layer_runs(start, end).extents())
    old = list(runs_from_extents(disk.layer_extents(start, end - start)).extents())
    assert new == old, (start, end)


@pytest.mark.parametrize("name", NAMES)
def test_layer_runs_equal_the_extent_path(images: dict[str, Path], name: str) -> None:
    with qcowlib.open(str(images[name])) as disk:
        size = disk.virtual_size
        # Fragmented: block formats by block (1-2 MiB), the rest far more.
        assert len(disk.layer_runs(0, size)) > (4 if name in ("vdi", "vpc") else 40)
        assert_runs_like_extents(disk, 0, size)
        assert_runs_like_extents(disk, size, size)
        rng = random.Random(name)
        for _ in range(60):
            a = rng.choice([rng.randrange(size), rng.randrange(size // 512) * 512])
            b = min(size, a + rng.choice([1, 512, 4096, 65536, 1 << 20, 5 << 20]))
            assert_runs_like_extents(disk, a, b)


@pytest.mark.parametrize("name", NAMES)
def test_converts_and_maps_like_qemu(images: dict[str, Path], name: str, tmp_path: Path) -> None:
    path, fmt = images[name], _fmt(name)
    want = qemu_raw(path, fmt, tmp_path)
    out = tmp_path / "ours.raw"
    res = cli("convert", "-f", fmt, "-O", "raw", path, out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == want
    ours = cli("map", "-f", fmt, "--output", "json", path)
    assert ours.returncode == 0, ours.stderr
    if not name.startswith("vhdx"):
        assert ours.stdout == qemu_img("map", "-f", fmt, "--output", "json", path).stdout
        return
    for e in json.loads(ours.stdout):
        if e["zero"]:
            assert want[e["start"] : e["start"] + e["length"]].count(0) == e["length"]


@pytest.mark.parametrize("name", ["vmdk-sparse", "vdi", "vpc", "vhdx"])
def test_converts_to_qcow2_like_qemu(images: dict[str, Path], name: str, tmp_path: Path) -> None:
    out = tmp_path / "ours.qcow2"
    res = cli("convert", "-O", "qcow2", images[name], out)
    assert res.returncode == 0, res.stderr
    assert qemu_img("compare", images[name], out).returncode == 0
    check = subprocess.run(["qemu-img", "check", str(out)], capture_output=True, check=False)
    assert check.returncode == 0, check.stdout
