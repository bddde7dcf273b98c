"""Mapping small qcow2 images without numpy (``reader_plain``): the same maps as
qemu-img, and the same extents and errors as the numpy path.

- qemu-img: ``qcowlib map`` runs in a fresh interpreter, where numpy is not loaded and
  the plain path maps small images; its JSON and human output must be qemu-img's, and
  numpy must stay unloaded (``-X importtime``, as tests/formats/test_registry.py).
- numpy path: in this process numpy is loaded; patching ``reader_plain.numpy_loaded``
  sends one opening of an image through the plain path, and its extents over any range,
  or its error, must be those of another opening on the numpy path.  Images qemu-img
  made, and the same images with arbitrary L1 and L2 entries poked in (hypothesis).
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import qcowlib
from qcowlib.errors import QcowlibError
from qcowlib.formats.qcow2 import reader_plain
from qcowlib.formats.qcow2.reader import Qcow2Disk
from tests.conftest import have_qemu, qemu_img, qemu_io, require_qemu, seeded_raw
from tests.formats.qcow2_entries import chunk_words

M = 1 << 20


def _create(path: Path, size: str, *opts: str, backing: Path | None = None) -> Path:
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        fmt = "qcow2" if backing.suffix == ".qcow2" else "raw"
        args += ["-b", backing.name, "-F", fmt]
    qemu_img(*args, path, size)
    return path


def _data(d: Path) -> Path:
    p = _create(d / "data.qcow2", "1G")
    qemu_io(p, "qcow2", "write -P 1 0 1M", "write -P 2 600M 64k", "write -z 1M 64k")
    qemu_io(p, "qcow2", "discard 256k 128k", "write -z -u 2M 128k", "write -P 3 1023M 64k")
    return p


def _v2(d: Path) -> Path:
    p = _create(d / "v2.qcow2", "256M", "compat=0.10")
    qemu_io(p, "qcow2", "write -P 1 0 192k", "write -z 64k 64k", "write -P 2 100M 4k")
    return p


def _compressed(kind: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = _create(d / f"{kind}.qcow2", "64M", f"compression_type={kind}")
        # Plain data too: a file of mostly compressed clusters looks preallocated to
        # QEMU's test, and the first qemu-img map after qemu-io then maps it otherwise.
        qemu_io(p, "qcow2", "write -c -P 7 0 64k", "write -c -P 8 64k 64k", "write -P 9 128k 1M")
        qemu_io(p, "qcow2", "write -c -z 1M 64k", "write -c -P 5 33M 64k")
        return p

    return make


def _extended(d: Path) -> Path:
    p = _create(d / "ext.qcow2", "2G", "extended_l2=on", "cluster_size=64k")
    qemu_io(p, "qcow2", "write -P 1 4k 2k", "write -z 16k 8k", "write -P 2 1M 64k")
    qemu_io(p, "qcow2", "write -z 1M 6k", "discard 1040k 4k", "write -P 3 1500M 10k")
    return p


def _small_clusters(d: Path) -> Path:
    p = _create(d / "c512.qcow2", "8M", "cluster_size=512")
    rng = random.Random(512)
    cmds = [
        f"write -P {i} {rng.randrange(0, 8 * M - 4096, 512)} {rng.randrange(512, 4096, 512)}"
        for i in range(40)
    ]
    qemu_io(p, "qcow2", *cmds, "write -z 1M 8k")
    return p


def _prealloc(d: Path) -> Path:
    p = _create(d / "prealloc.qcow2", "64M", "preallocation=metadata")
    qemu_io(p, "qcow2", "write -P 1 1M 128k", "write -z 8M 64k")
    return p


def _data_file(d: Path) -> Path:
    p = _create(d / "df.qcow2", "64M", f"data_file={d / 'df.data'}")
    qemu_io(p, "qcow2", "write -P 1 0 256k", "write -z 1M 64k", "write -P 2 40M 4k")
    return p


def _overlay_qcow2(d: Path) -> Path:
    base = _create(d / "base.qcow2", "256M")
    qemu_io(base, "qcow2", "write -P 1 0 4M", "write -P 2 100M 1M", "write -z 200M 1M")
    top = _create(d / "top.qcow2", "256M", "cluster_size=4k", backing=base)
    qemu_io(top, "qcow2", "write -P 3 1M 8k", "write -z 2M 64k", "write -P 4 100M 512k")
    qemu_io(top, "qcow2", "discard 3M 4k", "write -P 5 250M 4k")
    return top


def _overlay_raw(d: Path) -> Path:
    base = seeded_raw(d / "base.raw", 64 * M, seed=7)
    top = _create(d / "top-raw.qcow2", "80M", backing=base)
    qemu_io(top, "qcow2", "write -P 3 1M 128k", "write -z 2M 64k", "write -P 4 70M 64k")
    return top


def _chain(d: Path) -> Path:
    base = _create(d / "base.qcow2", "128M", "cluster_size=16k")
    qemu_io(base, "qcow2", "write -P 1 0 8M", "write -P 2 64M 64k")
    mid = _create(d / "mid.qcow2", "128M", "cluster_size=4k", backing=base)
    qemu_io(mid, "qcow2", "write -z 1M 1M", "write -P 3 5M 12k", "discard 7M 64k")
    top = _create(d / "top.qcow2", "128M", "extended_l2=on", backing=mid)
    qemu_io(top, "qcow2", "write -P 4 1536k 6k", "write -z 5M 4k", "write -P 5 100M 2k")
    return top


IMAGES: dict[str, Callable[[Path], Path]] = {
    "data": _data,
    "v2": _v2,
    "zlib": _compressed("zlib"),
    "zstd": _compressed("zstd"),
    "extended_l2": _extended,
    "512-byte clusters": _small_clusters,
    "metadata preallocation": _prealloc,
    "data file": _data_file,
    "overlay over qcow2": _overlay_qcow2,
    "overlay over raw": _overlay_raw,
    "chain of three": _chain,
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_qemu()
    made = {}
    for name, make in IMAGES.items():
        d = tmp_path_factory.mktemp(name.replace(" ", "-"))
        made[name] = make(d)
    return made


def _map_light(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``qcowlib map ARGS`` in a fresh interpreter, after checking that numpy (and the
    rest test_registry.py keeps out of metadata commands) stayed out."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qcowlib", "map", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    heavy = ("numpy", "concurrent.futures", "openstack", "construct", "dataclasses")
    assert [m for m in heavy if m in loaded] == []
    return out


RANGES = [
    (),
    ("--start-offset", "65536"),
    ("--start-offset", "1000000", "--max-length", "3000000"),
    ("--start-offset", "1048575", "--max-length", "70000"),
    ("--max-length", "0"),
]


@pytest.mark.parametrize("name", list(IMAGES))
def test_map_like_qemu_without_numpy(name: str, images: dict[str, Path]) -> None:
    path = images[name]
    for output in ("json", "human"):
        for rng in RANGES:
            args = ("--output", output, *rng, path)
            want = qemu_img("map", *args, check=False)
            got = _map_light(*args)
            # (human output refuses compressed clusters, as qemu-img does)
            assert (got.returncode, got.stdout) == (want.returncode, want.stdout), (output, rng)


# -- the plain path against the numpy path, in this process -----------------------------


def _extents(path: Path, plain: bool, start: int = 0, length: int | None = None) -> object:
    """The extents of ``[start, start + length)`` on one path, or its error.  The other
    path's table cache stays empty: each path maps the whole chain on its own."""
    with mock.patch.object(reader_plain, "numpy_loaded", lambda: not plain):
        try:
            with qcowlib.open(str(path)) as disk:
                got = list(disk.extents(start, length))
                for layer in disk.chain:
                    if isinstance(layer, Qcow2Disk):
                        assert not (layer._l2_cache if plain else layer._l2_plain)
        except QcowlibError as exc:
            return type(exc), str(exc), exc.structure, exc.field, exc.offset, exc.file
    return got


@pytest.mark.parametrize("name", list(IMAGES))
def test_plain_extents_equal_numpy(name: str, images: dict[str, Path]) -> None:
    path = images[name]
    with qcowlib.open(str(path)) as disk:
        size = disk.virtual_size
    rng = random.Random(name)
    cuts = [(0, None), (size // 3, size // 3), (M + 4097, 3 * M)]
    cuts += [(s, rng.randrange(0, size - s + 1)) for s in sorted(rng.sample(range(size), 8))]
    for start, length in cuts:
        assert _extents(path, True, start, length) == _extents(path, False, start, length)


# -- hostile tables: arbitrary entries poked into images qemu-img made -----------------

#: name -> (creation options, virtual size, writes: one per L2 table).
BASES = {
    "standard": (("cluster_size=4k",), 8 * M, (0, 2 * M, 4 * M, 6 * M)),
    "extended": (("extended_l2=on", "cluster_size=16k"), 48 * M, (0, 16 * M, 32 * M)),
    "v2": (("compat=0.10", "cluster_size=512"), 160 * 1024, (0, 32768, 65536, 131072)),
}


class Base:
    """An image qemu-img made, as bytes, with where its tables are."""

    def __init__(self, path: Path) -> None:
        with qcowlib.open(str(path)) as disk:
            assert isinstance(disk, Qcow2Disk)
            self.l2 = [int(o) for o in disk.l2_offsets if o]
            self.l1_offset = disk.header.l1_table_offset
            self.cs = disk.cluster_size
            self.extended = disk.extended_l2
            self.size = disk.virtual_size
        self.data = path.read_bytes()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    require_qemu()
    d = tmp_path_factory.mktemp("bases")
    out = {}
    for name, (opts, size, writes) in BASES.items():
        path = _create(d / f"{name}.qcow2", str(size), *opts)
        qemu_io(path, "qcow2", *(f"write -P {i + 1} {w} 4k" for i, w in enumerate(writes)))
        out[name] = Base(path)
        assert len(out[name].l2) == len(writes)
    return out


def _poke_l1(raw: bytearray, base: Base, index: int, entry: int) -> None:
    raw[base.l1_offset + 8 * index : base.l1_offset + 8 * index + 8] = struct.pack(">Q", entry)


@given(data=st.data())
@settings(
    max_examples=150 if have_qemu() else 1,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_poked_tables_map_alike(
    bases: dict[str, Base], tmp_path: Path, data: st.DataObject
) -> None:
    """Any L2 entries, and L1 entries dropped, past the end of the file or naming
    another table: the same extents, or the same error, on both paths, over any range."""
    base = bases[data.draw(st.sampled_from(sorted(bases)))]
    raw = bytearray(base.data)
    per_entry = 16 if base.extended else 8
    cluster_bits = base.cs.bit_length() - 1
    for _ in range(data.draw(st.integers(1, 4))):
        table = base.l2[data.draw(st.integers(0, len(base.l2) - 1))]
        at = table + per_entry * data.draw(st.integers(0, base.cs // per_entry - 1))
        words = data.draw(chunk_words(cluster_bits, base.extended))
        packed = struct.pack(f">{len(words)}Q", *words)[: table + base.cs - at]
        raw[at : at + len(packed)] = packed
    l1_change = data.draw(st.sampled_from([None, "drop", "past the end", "shared"]))
    if l1_change is not None:
        index = data.draw(st.integers(0, len(base.l2) - 1))
        entry = {
            "drop": 0,
            "past the end": (len(raw) // base.cs + 3) * base.cs,
            "shared": base.l2[0],
        }[l1_change]
        _poke_l1(raw, base, index, entry | (1 << 63 if entry else 0))
    path = tmp_path / "poked.qcow2"
    path.write_bytes(raw)
    start = data.draw(st.integers(0, base.size))
    length = data.draw(st.one_of(st.none(), st.integers(0, base.size - start)))
    plain = _extents(path, True, start, length)
    event("an error" if isinstance(plain, tuple) else "extents")
    assert plain == _extents(path, False, start, length)


def test_errors_in_the_numpy_paths_order(bases: dict[str, Base], tmp_path: Path) -> None:
    """A table past the end of the file before a table with an unaligned entry.  Over
    all four tables the numpy path decodes the good ones in a batch from the first table
    on, so the unaligned entry is reported first; over the first two alone there is no
    batch (one usable table) and the first table's offset is.  The plain path reads and
    decodes in the same order."""
    base = bases["standard"]
    raw = bytearray(base.data)
    _poke_l1(raw, base, 0, (len(raw) // base.cs + 3) * base.cs)
    raw[base.l2[1] + 8 : base.l2[1] + 16] = struct.pack(">Q", (1 << 63) | base.cs + 512)
    path = tmp_path / "two-bad.qcow2"
    path.write_bytes(raw)
    span = base.cs // 8 * base.cs
    for length, words in ((None, "L2 table 1"), (2 * span, "past the end")):
        plain = _extents(path, True, 0, length)
        assert plain == _extents(path, False, 0, length)
        assert isinstance(plain, tuple) and words in plain[1], plain


def test_plain_path_budget(tmp_path: Path) -> None:
    """Nine L2 tables of 64 KiB clusters are more than ``PLAIN_L2_BYTES``: the whole
    image maps on the numpy path, eight of them on the plain one, and a disk's budget
    is spent over several walks (a backing file's, one gap at a time)."""
    require_qemu()
    assert reader_plain.PLAIN_L2_BYTES == 8 * 65536  # the figures below assume it
    path = _create(tmp_path / "nine.qcow2", str(9 * 512 * M))
    qemu_io(path, "qcow2", *(f"write -P 1 {i * 512}M 4k" for i in range(9)))
    with mock.patch.object(reader_plain, "numpy_loaded", lambda: False):
        with qcowlib.open(str(path)) as disk:
            assert isinstance(disk, Qcow2Disk)
            assert len(list(disk.extents())) == 18
            assert (len(disk._l2_plain), len(disk._l2_cache)) == (0, 9)
        with qcowlib.open(str(path)) as disk:
            assert isinstance(disk, Qcow2Disk)
            for i in range(9):
                list(disk.extents(i * 512 * M, 512 * M))
            assert (len(disk._l2_plain), len(disk._l2_cache)) == (8, 1)


@pytest.mark.parametrize("bits", [1, 4, 16, 64])
def test_preallocation_test_counts_alike(bits: int, tmp_path: Path) -> None:
    """QEMU's metadata-preallocation test counts the same refcounts on both paths, for
    refcounts narrower and wider than a byte (and maps the same)."""
    require_qemu()
    path = _create(tmp_path / "p.qcow2", "64M", f"refcount_bits={bits}", "preallocation=metadata")
    qemu_io(path, "qcow2", "write -P 1 1M 64k")
    counts = []
    for plain in (True, False):
        with (
            mock.patch.object(reader_plain, "numpy_loaded", lambda p=plain: not p),
            qcowlib.open(str(path)) as disk,
        ):
            assert isinstance(disk, Qcow2Disk)
            counts.append((disk._count_refcounts(1 << 40), disk.metadata_preallocated()))
    assert counts[0] == counts[1]
    assert counts[0][1]  # qemu-img creates it so: the test must see it
    assert _extents(path, True) == _extents(path, False)


_MIDWAY = """
import sys, qcowlib
with qcowlib.open(sys.argv[1]) as disk:
    walk = disk.extents()
    got = [next(walk), next(walk)]
    assert "numpy" not in sys.modules  # the walk is on the plain path
    disk.layer_runs(0, disk.virtual_size)  # imports numpy, decodes the L1 table
    got += list(walk)
print(repr([tuple(e) for e in got]))
"""


@pytest.mark.parametrize("extended", [False, True])
def test_numpy_decoding_the_l1_table_midway_keeps_a_plain_walk_right(
    tmp_path: Path, extended: bool
) -> None:
    """A plain walk goes on after the numpy path decodes the L1 table (which drops its raw
    bytes) between two of its tables: another thread, or ``layer_runs`` called while
    ``extents()`` is iterated.  It used to take the dropped bytes for offset 0 and call
    the next L2 table "overlapping the header" (fresh interpreter: numpy not loaded)."""
    require_qemu()
    opts = "cluster_size=16384" + (",extended_l2=on" if extended else "")
    path = _create(tmp_path / "mid.qcow2", "64M", opts)
    qemu_io(path, "qcow2", *(f"write -P {i + 1} {i * 16}M 4k" for i in range(4)))
    with qcowlib.open(str(path)) as reference:
        expected = [tuple(e) for e in reference.extents()]
    out = subprocess.run(
        [sys.executable, "-c", _MIDWAY, str(path)], check=False, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(expected)
