"""Fragmented chains (scattered small writes over a mixed base), as overlays look after
use: the run arrays equal the extent map, and every writer's output passes
``qemu-img check`` and ``compare``, through the page cache and past it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcowlib
from qcowlib.core import hostfile as _file
from qcowlib.core import runs as runs_mod
from qcowlib.core.runs import ChainReader, RunSource, resolve
from qcowlib.formats.opener import open_disk
from qcowlib.ops.flatten import flatten, flatten_stream
from tests.conftest import qemu_img, qemu_io

pytestmark = pytest.mark.usefixtures("qemu")

SIZE = 64 << 20
K, M = 1 << 10, 1 << 20


def make_fragmented(tmp: Path, sizes: tuple[int, int, int], seed: int, writes: int = 300) -> Path:
    """base (mixed random / text / holes) <- mid <- top, each overlay with ``writes``
    scattered writes of 4-64 KiB (some of them zero writes)."""
    rng = random.Random(seed)
    raw = tmp / "base.raw"
    with raw.open("wb") as f:
        f.truncate(SIZE)
        for mib in range(0, SIZE // M, 2):
            f.seek(mib * M)
            if mib % 6 == 4:
                continue  # a hole
            if mib % 4 == 0:
                f.write(rng.randbytes(M))
            else:
                f.write((b"text line %d\n" % mib) * (M // 12))
    base = tmp / "base.qcow2"
    qemu_img("convert", "-q", "-O", "qcow2", "-o", f"cluster_size={sizes[0]}", raw, base)
    raw.unlink()
    prev = base
    for name, cs in (("mid", sizes[1]), ("top", sizes[2])):
        layer = tmp / f"{name}.qcow2"
        qemu_img(
            "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
            "-b", prev.name, "-F", "qcow2", layer,
        )  # fmt: skip
        cmds = []
        for k in range(writes):
            length = rng.randrange(8, 129) * 512
            off = rng.randrange(0, (SIZE - length) // 512) * 512
            if k % 10 == 9:
                cmds.append(f"write -z {off} {length}")
            else:
                cmds.append(f"write -P {k % 250 + 1} {off} {length}")
        qemu_io(layer, "qcow2", *cmds)
        prev = layer
    return prev


SHAPES = [
    pytest.param((64 * K, 64 * K, 64 * K), id="64k"),
    pytest.param((64 * K, 512, 2 * M), id="64k-512-2M"),
    pytest.param((2 * M, 64 * K, 512), id="2M-64k-512"),
]


@pytest.fixture(scope="module", params=SHAPES)
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sizes: tuple[int, int, int] = request.param
    tmp = tmp_path_factory.mktemp("frag")
    return make_fragmented(tmp, sizes, seed=sum(sizes))


@pytest.fixture(params=["direct", "page-cache"])
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "page-cache":
        monkeypatch.setattr(_file, "_open_direct", lambda fd: -1)
    yield request.param


def test_run_arrays_equal_the_extent_map(chain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_disk(str(chain)) as disk:
        expected = list(disk.extents())
        assert list(resolve(disk).extents()) == expected
        for layer in disk.chain:
            assert list(resolve(layer).extents()) == list(layer.extents())
        # Small windows: ranges asked for across window boundaries.
        monkeypatch.setattr(runs_mod, "WINDOW_BYTES", runs_mod.WINDOW_ALIGN)
        source = RunSource(disk)
        reader = ChainReader(disk)
        rng = random.Random(7)
        pos = 0
        buf = bytearray(3 * M)
        while pos < SIZE:
            n = min(SIZE - pos, rng.randrange(1, 3 * M))
            runs, a, b = source.get(pos, pos + n)
            view = memoryview(buf)[:n]
            reader.read(runs, a, b, pos, view)
            assert bytes(view) == disk.read(pos, n)
            pos += n


def test_flatten_fragmented_chain(chain: Path, write_path: str, tmp_path: Path) -> None:
    for compress in (False, True):
        out = tmp_path / f"flat-{compress}.qcow2"
        flatten(str(chain), str(out), compress=compress)
        assert qemu_img("check", out, check=False).returncode == 0
        assert qemu_img("compare", chain, out, check=False).returncode == 0
        with flatten_stream(str(chain), compress=compress) as stream:
            streamed = b"".join(stream)
        assert len(streamed) == stream.size
        assert streamed == out.read_bytes()


def test_convert_fragmented_chain(chain: Path, write_path: str, tmp_path: Path) -> None:
    raw = tmp_path / "out.raw"
    qcowlib.convert(str(chain), str(raw), "raw")
    assert qemu_img("compare", "-F", "raw", chain, raw, check=False).returncode == 0
    back = tmp_path / "back.qcow2"
    qcowlib.convert(str(raw), str(back), "qcow2", src_format="raw")
    assert qemu_img("check", back, check=False).returncode == 0
    assert qemu_img("compare", "-f", "raw", raw, back, check=False).returncode == 0
    vmdk = tmp_path / "out.vmdk"
    qcowlib.convert(str(chain), str(vmdk), "vmdk", options={"subformat": "streamOptimized"})
    assert qemu_img("check", vmdk, check=False).returncode == 0
    assert qemu_img("compare", chain, vmdk, check=False).returncode == 0
    comp = tmp_path / "c.qcow2"
    qcowlib.convert(str(chain), str(comp), "qcow2", compress=True)
    uncompressed = tmp_path / "u.raw"
    qcowlib.convert(str(comp), str(uncompressed), "raw")
    assert raw.read_bytes() == uncompressed.read_bytes()
