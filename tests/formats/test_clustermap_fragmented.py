"""Fragmented QED, Parallels and qcow (v1) images, as guests leave them, against qemu-img.

Each image gets thousands of scattered writes of 512 B to 64 KiB (``qemu-io``), so its
clusters lie in the file in the order they were first written and its map has
thousands of runs.  Whole-disk reads (the API and ``convert -O raw``) must be
byte-identical to ``qemu-img convert -O raw``, ``map --output json`` identical to
qemu-img's, and random partial reads equal to the same bytes; a copy of each image
with its zero blocks punched out as holes must map as qemu-img maps it too (qemu-img
does not look for holes inside these formats' data clusters).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import qcowlib
from tests.conftest import cli, qemu_img, qemu_io
from tests.formats.oracle import assert_converts_to_qcow2, qemu_raw

pytestmark = pytest.mark.usefixtures("qemu")

SIZE = 48 << 20
WRITES = 2000


def scattered_writes(seed: int, size: int = SIZE, count: int = WRITES) -> list[str]:
    """``count`` qemu-io writes of 512 B to 64 KiB (log-uniform, 512-aligned) at random
    512-aligned offsets, each with its own pattern."""
    rng = random.Random(seed)
    cmds = []
    for i in range(count):
        n = 512 * min(128, int(2 ** rng.uniform(0, 7.01)))
        off = rng.randrange(0, (size - n) // 512) * 512
        cmds.append(f"write -q -P {1 + i % 255} {off} {n}")
    return cmds


def make(path: Path, fmt: str, *opts: str, extra: tuple[str, ...] = ()) -> Path:
    qemu_img("create", "-q", "-f", fmt, *opts, path, str(SIZE))
    cmds = scattered_writes(len(path.name))
    for at in range(0, len(cmds), 1000):
        qemu_io(path, fmt, *cmds[at : at + 1000])
    if extra:
        qemu_io(path, fmt, *extra)
    return path


# Zero clusters: QED stores whole-cluster zero writes as entries of 1.
QED_ZEROES = tuple(f"write -q -z {c * (1 << 20)} 64k" for c in range(3, 40, 5))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fragmented")
    out = {
        "qed-4k": make(d / "a4k.qed", "qed", "-o", "cluster_size=4096", extra=QED_ZEROES),
        "qed-64k": make(d / "a64k.qed", "qed", "-o", "cluster_size=65536", extra=QED_ZEROES),
        "parallels-1m": make(d / "a1m.parallels", "parallels"),
        "parallels-64k": make(d / "a64k.parallels", "parallels", "-o", "cluster_size=64k"),
    }
    qcow = d / "a.qcow"
    qemu_img("convert", "-q", "-O", "qcow", out["qed-64k"], qcow)
    out["qcow"] = qcow
    compressed = d / "c.qcow"
    # qemu-img 7.2 writes a good compressed qcow but exits 1 (see test_qcow.py).
    qemu_img("convert", "-q", "-c", "-O", "qcow", out["qed-4k"], compressed, check=False)
    assert qemu_img("compare", out["qed-4k"], compressed).returncode == 0
    out["qcow-compressed"] = compressed
    return out


#: Each image's map has at least this many entries (a sanity check that it is fragmented).
MIN_RUNS = {
    "qed-4k": 1000,
    "qed-64k": 300,
    "parallels-1m": 20,
    "parallels-64k": 300,
    "qcow": 300,
    "qcow-compressed": 1000,
}
NAMES = list(MIN_RUNS)


def _map_runs(path: Path) -> int:
    return len(qemu_img("map", "--output", "json", path).stdout.splitlines())


@pytest.mark.parametrize("name", NAMES)
def test_reads_and_maps_like_qemu(images: dict[str, Path], name: str, tmp_path: Path) -> None:
    path = images[name]
    assert _map_runs(path) >= MIN_RUNS[name]
    want = qemu_raw(path, tmp_path)
    with qcowlib.open(str(path)) as disk:
        assert disk.read(0, disk.virtual_size) == want
    out = tmp_path / "ours.raw"
    res = cli("convert", "-O", "raw", path, out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == want
    ours = cli("map", "--output", "json", path)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == qemu_img("map", "--output", "json", path).stdout


@pytest.mark.parametrize("name", NAMES)
def test_random_partial_reads(images: dict[str, Path], name: str, tmp_path: Path) -> None:
    path = images[name]
    want = qemu_raw(path, tmp_path)
    rng = random.Random(name)
    with qcowlib.open(str(path)) as disk:
        for _ in range(300):
            n = rng.choice([1, 511, 4096, 65536, 300_000, 3 << 20])
            off = rng.randrange(0, SIZE - n)
            assert disk.read(off, n) == want[off : off + n], (off, n)


@pytest.mark.parametrize("name", ["qed-4k", "parallels-64k", "qcow"])
def test_converts_to_qcow2(images: dict[str, Path], name: str, tmp_path: Path) -> None:
    assert_converts_to_qcow2(images[name], tmp_path)


def _punch_zero_blocks(src: Path, dst: Path, block: int = 4096) -> None:
    """A copy of ``src`` with every all-zero block left a hole (``cp --sparse=always``)."""
    zero = bytes(block)
    with src.open("rb") as f, dst.open("wb") as g:
        g.truncate(src.stat().st_size)
        pos = 0
        while chunk := f.read(block):
            if chunk != zero[: len(chunk)]:
                g.seek(pos)
                g.write(chunk)
            pos += len(chunk)


@pytest.mark.parametrize("name", ["qed-64k", "parallels-1m", "qcow"])
def test_holes_inside_data_clusters_map_as_qemu(
    images: dict[str, Path], name: str, tmp_path: Path
) -> None:
    sparse = tmp_path / images[name].name
    _punch_zero_blocks(images[name], sparse)
    ours = cli("map", "--output", "json", sparse)
    assert ours.stdout == qemu_img("map", "--output", "json", sparse).stdout
    out = tmp_path / "ours.raw"
    assert cli("convert", "-O", "raw", sparse, out).returncode == 0
    assert out.read_bytes() == qemu_raw(sparse, tmp_path)


@pytest.mark.parametrize("fmt", ["qed", "qcow"])
def test_fragmented_overlay_on_a_base(fmt: str, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "qcow2", *scattered_writes(7, count=300))
    top = tmp_path / f"top.{fmt}"
    opts = ("-o", "cluster_size=4096") if fmt == "qed" else ()
    qemu_img("create", "-q", "-f", fmt, *opts, "-b", base.name, "-F", "qcow2", top)
    # qemu writes qcow (v1) clusters one synchronous copy-on-write at a time: fewer.
    qemu_io(top, fmt, *scattered_writes(8, count=1000 if fmt == "qed" else 150))
    want = qemu_raw(top, tmp_path)
    out = tmp_path / "ours.raw"
    res = cli("convert", "-O", "raw", top, out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == want
    ours = cli("map", "--output", "json", top)
    assert ours.stdout == qemu_img("map", "--output", "json", top).stdout
