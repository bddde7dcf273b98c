"""Every input format to every output format, against qemu-img.

Inputs are made by qemu-img from one seeded raw disk (every subformat it writes); each
is converted by qcowlib to every format and subformat qcowlib writes.  Each output must
be equal to its input in ``qemu-img compare``, clean in ``qemu-img check`` where qemu-img
can check the format, and of the subformat asked for.  ``map`` runs equal qemu-img's for
every input (VHDX excepted: qemu-img 7.2 has no block status for VHDX and reports one
data run, so there the zero runs qcowlib reports are checked against qemu-img's read).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import qcowlib
from qcowlib.formats import registry
from qcowlib.ops.map import map_entries
from tests.conftest import qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")

SIZE = (6 << 20) + 3 * 512  # not a multiple of any block size
#: (name, qemu-img format, -o options) of every input.
INPUTS = [
    ("raw", "raw", ""),
    ("qcow2", "qcow2", "cluster_size=4096"),
    ("qcow2-zstd-c", "qcow2", "compression_type=zstd"),
    ("vmdk-sparse", "vmdk", "subformat=monolithicSparse"),
    ("vmdk-stream", "vmdk", "subformat=streamOptimized"),
    ("vmdk-flat", "vmdk", "subformat=monolithicFlat"),
    ("vmdk-2gb-sparse", "vmdk", "subformat=twoGbMaxExtentSparse"),
    ("vmdk-2gb-flat", "vmdk", "subformat=twoGbMaxExtentFlat"),
    ("vdi", "vdi", "static=off"),
    ("vdi-static", "vdi", "static=on"),
    ("vpc", "vpc", "subformat=dynamic"),
    ("vpc-fixed", "vpc", "subformat=fixed"),
    ("vhdx", "vhdx", "subformat=dynamic"),
    ("vhdx-fixed", "vhdx", "subformat=fixed"),
]
#: (qcowlib format, options, compress, what qemu-img info shows to check it).
OUTPUTS = [
    ("raw", {}, False, None),
    ("qcow2", {}, False, None),
    ("qcow2", {"compression_type": "zstd"}, True, ("compression-type", "zstd")),
    ("vmdk", {"subformat": "monolithicSparse"}, False, ("create-type", "monolithicSparse")),
    ("vmdk", {"subformat": "streamOptimized"}, False, ("create-type", "streamOptimized")),
    ("vmdk", {"subformat": "streamOptimized"}, True, ("create-type", "streamOptimized")),
    ("vdi", {"static": "off"}, False, None),
    ("vdi", {"static": "on"}, False, None),
    ("vpc", {"subformat": "dynamic"}, False, None),
    ("vpc", {"subformat": "fixed"}, False, None),
    ("vhdx", {"subformat": "dynamic"}, False, None),
    ("vhdx", {"subformat": "fixed"}, False, None),
]
#: Outputs qemu-img can check ("format does not support checks" for the others).
CHECKABLE = tuple(f for f in registry.writable() if not registry.by_name(f).nothing_to_check)


def _seeded_raw(path: Path) -> None:
    rng = random.Random(20261202)
    with path.open("wb") as f:
        f.truncate(SIZE)
        for _ in range(12):
            n = rng.randrange(1, 400_000)
            f.seek(rng.randrange(0, SIZE - n))
            f.write(rng.randbytes(n) if rng.random() < 0.5 else b"qcowlib " * (n // 8))
        f.seek(SIZE - 512)
        f.write(b"\xee" * 512)  # the last sector, past any whole block


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("matrix-in")
    raw = d / "seed.raw"
    _seeded_raw(raw)
    out: dict[str, tuple[Path, str]] = {}
    for name, fmt, opts in INPUTS:
        path = d / f"{name}.{fmt}"
        args = ["-o", opts] if opts else []
        if name.endswith("-c"):
            args.append("-c")
        qemu_img("convert", "-f", "raw", "-O", fmt, *args, raw, path)
        out[name] = (path, fmt)
    return out


@pytest.mark.parametrize("name", [i[0] for i in INPUTS])
def test_convert_to_every_format(
    name: str, inputs: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    src, src_fmt = inputs[name]
    for i, (fmt, opts, compress, shows) in enumerate(OUTPUTS):
        dst = tmp_path / f"out{i}.{fmt}"
        qcowlib.convert(
            str(src), str(dst), fmt, src_format=src_fmt, compress=compress, options=opts
        )
        what = (name, fmt, opts, compress)
        res = qemu_img("compare", "-f", src_fmt, "-F", fmt, src, dst, check=False)
        assert res.returncode == 0, (what, res.stdout, res.stderr)
        if fmt in CHECKABLE:
            res = qemu_img("check", "-f", fmt, dst, check=False)
            assert res.returncode == 0, (what, res.stdout, res.stderr)
        info = qemu_json("info", "-f", fmt, dst)
        assert "backing-filename" not in info
        if shows is not None:
            key, value = shows
            assert info["format-specific"]["data"][key] == value, what
        if compress and fmt == "qcow2":
            assert qemu_json("check", dst).get("compressed-clusters", 0) > 0, what


@pytest.mark.parametrize("name", [i[0] for i in INPUTS])
def test_map_matches_qemu(name: str, inputs: dict[str, tuple[Path, str]]) -> None:
    path, fmt = inputs[name]
    with qcowlib.open(str(path), fmt) as disk:
        ours = [e.as_json() for e in map_entries(disk)]
        if fmt != "vhdx":
            got = qemu_img("map", "-f", fmt, "--output=json", path).stdout
            assert ours == json.loads(got)
            return
        # qemu-img: one data run over the whole disk; ours must at least be true.
        ref = path.with_suffix(".ref")
        qemu_img("convert", "-f", fmt, "-O", "raw", path, ref)
        content = ref.read_bytes()
        assert disk.read(0, disk.virtual_size) == content
        for e in ours:
            if e["zero"] and not e["data"]:
                assert content[e["start"] : e["start"] + e["length"]].count(0) == e["length"]
        assert sum(e["length"] for e in ours if e["data"]) < len(content)
