"""``check`` against ``qemu-img check``: fixtures, poked corruptions and repairs.

Every comparison runs qemu-img and qcowlib on byte-identical copies with the same file
name (in different directories), so whole outputs can be compared: exit status, stdout
(human and JSON) and the stderr lines (qemu-img's ``qemu-img:`` prefix and ours aside).
After a repair, the two copies must get the same ``qemu-img check`` result and the same
guest content (``qemu-img compare``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qcowlib.cli import main as cli_main
from qcowlib.ops.check import CheckNotSupported, check
from tests.conftest import have_qemu, qemu_img

if have_qemu():
    from tests.fixtures.generate import ensure_fixtures

    FIXTURES = ensure_fixtures()
    QCOW2 = sorted(n for n, f in FIXTURES.items() if f.fmt == "qcow2")
else:  # pragma: no cover - conftest's require_qemu decides skip or fail
    FIXTURES = {}
    QCOW2 = ["<qemu-img missing>"]

pytestmark = pytest.mark.usefixtures("qemu")

Outcome = tuple[int, str, str]
MiB = 1024 * 1024


# -- running both tools -------------------------------------------------------------------


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def ours(workdir: Path, *args: str) -> Outcome:
    """``qcowlib ARGS`` run in-process from ``workdir``: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with _cwd(workdir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(list(args))
    return status, out.getvalue(), _strip(err.getvalue(), "qcowlib: error: ")


def qemu(workdir: Path, *args: str) -> Outcome:
    res = subprocess.run(
        ["qemu-img", *args], cwd=workdir, capture_output=True, text=True, check=False
    )
    return res.returncode, res.stdout, _strip(res.stderr, "qemu-img: ")


def _strip(text: str, prefix: str) -> str:
    return "".join(line.removeprefix(prefix) for line in text.splitlines(keepends=True))


def twin(src: Path, root: Path, tree: Path | None = None) -> tuple[Path, Path]:
    """Two copies of the directory tree holding ``src`` (``tree``, default its own
    directory, so backing files come along): the directories of qemu's and our copy."""
    tree = tree or src.parent
    rel = src.parent.relative_to(tree)
    copies = []
    for who in ("qemu", "ours"):
        dst = root / who
        shutil.copytree(tree, dst, symlinks=True)
        copies.append(dst / rel)
    return copies[0], copies[1]


def fixture_tree(name: str) -> Path:
    """The directory of a fixture (an image may sit in a subdirectory of it)."""
    path = FIXTURES[name].path
    return next(p for p in path.parents if p.name == name)


def both(qdir: Path, odir: Path, *args: str) -> tuple[Outcome, Outcome]:
    return qemu(qdir, *args), ours(odir, *args)


def readable(path: Path) -> bool:
    """Whether qemu-img can read all of the guest content."""
    return qemu_img("compare", path, path, check=False).returncode == 0


def assert_same_guest(a: Path, b: Path) -> None:
    """The same guest content, or both unreadable alike (qemu-img compare)."""
    cmp = qemu_img("compare", a, b, check=False)
    if cmp.returncode == 0:
        return
    assert not readable(a) and not readable(b), cmp.stdout + cmp.stderr


def assert_same_after_repair(qpath: Path, opath: Path) -> None:
    """Both repaired copies: the same qemu-img check result and the same guest content."""
    qres = qemu(qpath.parent, "check", "--output=json", qpath.name)
    ores = qemu(opath.parent, "check", "--output=json", opath.name)
    assert ores == qres
    assert_same_guest(qpath, opath)


# -- image layout helpers (independent of the code under test) ----------------------------


@dataclass
class Layout:
    """Where a qcow2 image's metadata lies (parsed with struct)."""

    path: Path
    cluster_size: int
    refcount_bits: int
    l1_offset: int
    reftable_offset: int
    extended_l2: bool

    @classmethod
    def read(cls, path: Path) -> Layout:
        d = path.read_bytes()
        version, cluster_bits = (
            struct.unpack_from(">I", d, 4)[0],
            struct.unpack_from(">I", d, 20)[0],
        )
        order = struct.unpack_from(">I", d, 96)[0] if version == 3 else 4
        incompat = struct.unpack_from(">Q", d, 72)[0] if version == 3 else 0
        return cls(
            path,
            1 << cluster_bits,
            1 << order,
            struct.unpack_from(">Q", d, 40)[0],
            struct.unpack_from(">Q", d, 48)[0],
            bool(incompat & 16),
        )

    def u64(self, offset: int) -> int:
        with self.path.open("rb") as f:
            f.seek(offset)
            return int(struct.unpack(">Q", f.read(8))[0])

    def poke64(self, offset: int, value: int) -> None:
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">Q", value))

    def l1_entry(self, index: int) -> int:
        return self.l1_offset + 8 * index

    def l2_table(self, l1_index: int = 0) -> int:
        return self.u64(self.l1_entry(l1_index)) & 0x00FF_FFFF_FFFF_FE00

    def l2_entry(self, guest_offset: int) -> int:
        """File offset of the L2 entry mapping ``guest_offset``."""
        entry_size = 16 if self.extended_l2 else 8
        per_table = self.cluster_size // entry_size
        cluster = guest_offset // self.cluster_size
        return self.l2_table(cluster // per_table) + (cluster % per_table) * entry_size

    def refblock(self, index: int = 0) -> int:
        return self.u64(self.reftable_offset + 8 * index)

    def set_refcount(self, cluster: int, value: int) -> None:
        """Write one refcount entry (any width; sub-byte entries LSB first)."""
        bits = self.refcount_bits
        per_block = self.cluster_size * 8 // bits
        block = self.refblock(cluster // per_block)
        index = cluster % per_block
        with self.path.open("r+b") as f:
            if bits >= 8:
                f.seek(block + index * bits // 8)
                f.write(value.to_bytes(bits // 8, "big"))
            else:
                f.seek(block + index * bits // 8)
                byte = f.read(1)[0]
                shift = index * bits % 8
                mask = ((1 << bits) - 1) << shift
                f.seek(block + index * bits // 8)
                f.write(bytes([(byte & ~mask) | (value << shift)]))


def make(path: Path, size: str, *io_cmds: str, opts: str = "") -> Path:
    """An image made by qemu-img create and qemu-io writes."""
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, path, size)
    if io_cmds:
        argv = ["qemu-io", "-f", "qcow2"]
        for c in io_cmds:
            argv += ["-c", c]
        subprocess.run([*argv, str(path)], check=True, capture_output=True)
    return path


# -- every fixture ------------------------------------------------------------------------


@pytest.mark.parametrize("name", QCOW2)
def test_fixture_check_equals_qemu(name: str) -> None:
    path = FIXTURES[name].path
    workdir = path.parent
    for output in ("json", "human"):
        ref, got = both(workdir, workdir, "check", f"--output={output}", path.name)
        assert got == ref, output
        if output == "json" and ref[1]:
            assert json.loads(got[1]) == json.loads(ref[1])


def test_fixtures_cover_every_refcount_width() -> None:
    widths = {
        int(tag.split("_")[1])
        for f in FIXTURES.values()
        for tag in f.tags
        if tag.startswith("refcount_")
    }
    assert widths >= {1, 2, 4, 8, 16, 32, 64}


def test_plain_check_never_writes(tmp_path: Path) -> None:
    fx = FIXTURES["dirty-lazy-refcounts"].path
    copy = tmp_path / "image.qcow2"
    shutil.copy(fx, copy)
    before = copy.read_bytes()
    report = check(str(copy))
    assert report.status == 2 and report.corruptions == 10
    assert copy.read_bytes() == before


@pytest.mark.parametrize("name", QCOW2)
def test_fixture_repair_equals_qemu(name: str, tmp_path: Path) -> None:
    """-r leaks / -r all on clean fixtures (and the dirty one) act as qemu-img's."""
    src = FIXTURES[name].path
    for mode in ("leaks", "all"):
        qdir, odir = twin(src, tmp_path / mode, fixture_tree(name))
        ref, got = both(qdir, odir, "check", "-r", mode, "--output=json", src.name)
        assert got == ref, mode
        if "bitmap" in FIXTURES[name].tags:
            # qemu-img re-stores persistent bitmaps whenever it opens an image read-write,
            # which moves them; both images must still be clean and read the same.
            for path in (qdir / src.name, odir / src.name):
                assert qemu_img("check", path, check=False).returncode == 0
            assert_same_guest(qdir / src.name, odir / src.name)
        else:
            assert_same_after_repair(qdir / src.name, odir / src.name)


def test_dirty_lazy_refcounts_like_qemu(tmp_path: Path) -> None:
    """A dirty image is not repaired by a plain check; -r leaks refuses to rebuild the
    refcounts (status 1), -r all rebuilds them and clears the dirty flag."""
    src = FIXTURES["dirty-lazy-refcounts"].path
    qdir, odir = twin(src, tmp_path)
    status, _out, err = ours(odir, "check", "-r", "leaks", src.name)
    assert status == 1
    assert err.splitlines()[-2:] == [
        "ERROR need to rebuild refcount structures",
        "Check failed: Input/output error",
    ]
    ref, got = both(qdir, odir, "check", "-r", "all", src.name)
    assert got == ref
    assert got[0] == 0 and "Rebuilding refcount structure" in got[2]
    assert "0 leaked clusters\n    5 corruptions" in got[1]
    assert_same_after_repair(qdir / src.name, odir / src.name)
    info = json.loads(qemu_img("info", "--output=json", odir / src.name).stdout)
    assert info["dirty-flag"] is False


# -- poked corruptions ----------------------------------------------------------------------


def _base(path: Path) -> Layout:
    """1 MiB, 64 KiB clusters: header, reftable, refblock, L1, L2, then data clusters
    for guest clusters 0, 1 and 8."""
    make(path, "1M", "write -P 1 0 128k", "write -P 2 512k 64k")
    return Layout.read(path)


def _leak(lay: Layout) -> None:
    lay.poke64(lay.l2_entry(64 * 1024), 0)  # guest cluster 1 unmapped, its cluster leaked


def _refcount_zero(lay: Layout) -> None:
    data = lay.u64(lay.l2_entry(0)) & 0x00FF_FFFF_FFFF_FE00
    lay.set_refcount(data // lay.cluster_size, 0)


def _l2_entry_past_eof(lay: Layout) -> None:
    lay.poke64(lay.l2_entry(64 * 1024), (1 << 63) | 80 * lay.cluster_size)


def _misaligned_l2_table(lay: Layout) -> None:
    lay.poke64(lay.l1_entry(0), (1 << 63) | (lay.l2_table() + 512))


def _two_entries_one_cluster(lay: Layout) -> None:
    lay.poke64(lay.l2_entry(64 * 1024), lay.u64(lay.l2_entry(0)))


def _l2_table_is_reftable(lay: Layout) -> None:
    lay.poke64(lay.l1_entry(0), (1 << 63) | lay.reftable_offset)


def _refcount_block_outside_image(lay: Layout) -> None:
    lay.poke64(lay.reftable_offset + 8 * 5, 40 * lay.cluster_size)


def _reftable_reserved_bits(lay: Layout) -> None:
    lay.poke64(lay.reftable_offset, lay.refblock() | 1)


def _l1_reserved_bits(lay: Layout) -> None:
    lay.poke64(lay.l1_entry(0), lay.u64(lay.l1_entry(0)) | (1 << 56))


def _copied_flag_cleared(lay: Layout) -> None:
    lay.poke64(lay.l2_entry(0), lay.u64(lay.l2_entry(0)) & ~(1 << 63))


def _refcount_too_high(lay: Layout) -> None:
    data = lay.u64(lay.l2_entry(0)) & 0x00FF_FFFF_FFFF_FE00
    lay.set_refcount(data // lay.cluster_size, 3)


def _misaligned_preallocated_zero(lay: Layout) -> None:
    data = lay.u64(lay.l2_entry(0)) & 0x00FF_FFFF_FFFF_FE00
    lay.poke64(lay.l2_entry(0), (1 << 63) | (data + 512) | 1)


CORRUPTIONS: dict[str, tuple[Callable[[Layout], None], int]] = {
    # name: (poke, qemu-img check status)
    "leaked cluster": (_leak, 3),
    "refcount zero but referenced": (_refcount_zero, 2),
    "refcount too high": (_refcount_too_high, 2),
    "L2 entry past EOF": (_l2_entry_past_eof, 2),
    "misaligned L2 table offset": (_misaligned_l2_table, 2),
    "two L2 entries, one cluster": (_two_entries_one_cluster, 2),
    "L2 table overlaps refcount table": (_l2_table_is_reftable, 2),
    "refcount block outside image": (_refcount_block_outside_image, 2),
    "refcount table reserved bits": (_reftable_reserved_bits, 2),
    "L1 entry reserved bits": (_l1_reserved_bits, 2),
    "OFLAG_COPIED cleared": (_copied_flag_cleared, 2),
    "misaligned preallocated zero cluster": (_misaligned_preallocated_zero, 2),
}


@pytest.fixture
def corrupted(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(pristine, qemu's copy, our copy) of the base image with one corruption."""
    name = request.param
    src = tmp_path / "src" / "img.qcow2"
    src.parent.mkdir()
    CORRUPTIONS[name][0](_base(src))
    qdir, odir = twin(src, tmp_path)
    return src, qdir / src.name, odir / src.name


@pytest.mark.parametrize("corrupted", list(CORRUPTIONS), indirect=True)
def test_corruption_check_equals_qemu(
    corrupted: tuple[Path, Path, Path], request: pytest.FixtureRequest
) -> None:
    _src, qpath, opath = corrupted
    expected_status = CORRUPTIONS[request.node.callspec.params["corrupted"]][1]
    for output in ("human", "json"):
        ref, got = both(qpath.parent, opath.parent, "check", f"--output={output}", qpath.name)
        assert ref[0] == expected_status
        assert got == ref, output
    report = check(str(opath))
    assert report.status == expected_status
    assert report.corruptions or report.leaks


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("corrupted", list(CORRUPTIONS), indirect=True)
def test_corruption_repair_equals_qemu(corrupted: tuple[Path, Path, Path], mode: str) -> None:
    src, qpath, opath = corrupted
    ref, got = both(qpath.parent, opath.parent, "check", "-r", mode, qpath.name)
    assert got == ref
    assert_same_after_repair(qpath, opath)
    after = qemu(opath.parent, "check", opath.name)
    if mode == "all" and after[0] == 0 and readable(src):
        # Guest content is what the damaged image showed (qemu-img never changes it).
        assert qemu_img("compare", src, opath, check=False).returncode == 0


def test_repair_all_leaves_clean_images(tmp_path: Path) -> None:
    """The repairable corruptions: after -r all, qemu-img check finds nothing."""
    for name in (
        "leaked cluster",
        "refcount zero but referenced",
        "refcount too high",
        "two L2 entries, one cluster",
        "L2 table overlaps refcount table",
        "refcount block outside image",
        "OFLAG_COPIED cleared",
        "misaligned preallocated zero cluster",
    ):
        path = tmp_path / name.replace(" ", "-") / "img.qcow2"
        path.parent.mkdir()
        CORRUPTIONS[name][0](_base(path))
        report = check(str(path), repair="all")
        assert report.status == 0, name
        assert report.corruptions_fixed + report.leaks_fixed > 0, name
        assert qemu_img("check", path, check=False).returncode == 0, name


def test_repair_leaks_on_leak_only_image(tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    _leak(_base(path))
    assert qemu_img("check", path, check=False).returncode == 3
    ref = tmp_path / "ref.qcow2"
    shutil.copyfile(path, ref)
    qemu_img("check", "-q", "-r", "leaks", ref, check=False)
    blocks_before = path.stat().st_blocks
    status, out, err = ours(tmp_path, "check", "-r", "leaks", "img.qcow2")
    assert status == 0
    assert out.startswith(
        "The following inconsistencies were found and repaired:\n\n"
        "    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n"
        "No errors were found on the image.\n"
    )
    assert (
        err
        == "Leaked cluster 6 refcount=1 reference=0\nRepairing cluster 6 refcount=1 reference=0\n"
    )
    assert qemu_img("check", path, check=False).returncode == 0
    # the freed cluster is given back to the file system, as qemu-img's repair does
    cluster = path.read_bytes()[6 * 65536 : 7 * 65536]
    assert cluster == ref.read_bytes()[6 * 65536 : 7 * 65536] == bytes(65536)
    assert path.stat().st_blocks <= blocks_before - 65536 // 512


def test_refcount_too_low_with_snapshot_is_fixed_in_place(tmp_path: Path) -> None:
    """A shared cluster whose refcount drops from 2 to 1 is fixed without a rebuild."""
    src = tmp_path / "src" / "img.qcow2"
    src.parent.mkdir()
    lay = _base(src)
    qemu_img("snapshot", "-c", "s1", src)
    data = lay.u64(lay.l2_entry(0)) & 0x00FF_FFFF_FFFF_FE00
    lay.set_refcount(data // lay.cluster_size, 1)
    qdir, odir = twin(src, tmp_path)
    ref, got = both(qdir, odir, "check", src.name)
    assert got == ref and got[0] == 2
    ref, got = both(qdir, odir, "check", "-r", "all", src.name)
    assert got == ref and got[0] == 0
    assert "Rebuilding" not in got[2] and "Repairing cluster" in got[2]
    assert_same_after_repair(qdir / src.name, odir / src.name)


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in QCOW2
        if any(t.startswith("refcount_") and t != "refcount_16" for t in FIXTURES[n].tags)
    ],
)
def test_repair_every_refcount_width(name: str, tmp_path: Path) -> None:
    """Leak one cluster and zero another's refcount, then -r all as qemu-img does it
    (refcount blocks are written back in every entry width)."""
    src = tmp_path / "src" / "image.qcow2"
    shutil.copytree(fixture_tree(name), src.parent)
    lay = Layout.read(src)
    entry_size = 16 if lay.extended_l2 else 8
    table = lay.l2_table()
    entries = [lay.u64(table + i * entry_size) for i in range(lay.cluster_size // entry_size)]
    standard = [i for i, e in enumerate(entries) if e >> 62 == 2 and e & 0x00FF_FFFF_FFFF_FE00]
    assert len(standard) >= 2
    lay.poke64(table + standard[0] * entry_size, 0)
    other = entries[standard[1]] & 0x00FF_FFFF_FFFF_FE00
    lay.set_refcount(other // lay.cluster_size, 0)
    qdir, odir = twin(src, tmp_path)
    ref, got = both(qdir, odir, "check", "--output=json", src.name)
    assert got == ref and got[0] == 2
    ref, got = both(qdir, odir, "check", "-r", "all", "--output=json", src.name)
    assert got == ref and got[0] == 0
    assert_same_after_repair(qdir / src.name, odir / src.name)


# -- snapshot table and shared tables -------------------------------------------------------


def _snapshot_entries(d: bytes) -> tuple[int, list[tuple[bytes, bytes, bytes]]]:
    """The snapshot table's offset and its entries as (header, extra data, names)."""
    nb, offset = struct.unpack_from(">IQ", d, 60)
    pos, out = offset, []
    for _ in range(nb):
        pos = (pos + 7) & ~7
        header = d[pos : pos + 40]
        id_len, name_len = struct.unpack_from(">HH", header, 12)
        extra = struct.unpack_from(">I", header, 36)[0]
        out.append(
            (
                header,
                d[pos + 40 : pos + 40 + extra],
                d[pos + 40 + extra : pos + 40 + extra + id_len + name_len],
            )
        )
        pos += 40 + extra + id_len + name_len
    return offset, out


def _rewrite_snapshot_table(path: Path, entries: list[tuple[bytes, bytes, bytes]]) -> None:
    """Write a new snapshot table at the end of the file and point the header at it."""
    d = bytearray(path.read_bytes())
    table = bytearray()
    for header, extra, names in entries:
        table += bytes(-len(table) % 8)
        h = bytearray(header)
        struct.pack_into(">I", h, 36, len(extra))
        table += h + extra + names
    offset = -(-len(d) // 65536) * 65536
    d += bytes(offset - len(d)) + table + bytes(-len(table) % 65536)
    struct.pack_into(">Q", d, 64, offset)
    path.write_bytes(bytes(d))


def _incomplete_entry(entries: list[tuple[bytes, bytes, bytes]]) -> None:
    header, extra, names = entries[0]
    entries[0] = (header, extra[:8], names)  # v3 entries need at least 16 bytes


def _too_much_extra_data(entries: list[tuple[bytes, bytes, bytes]]) -> None:
    header, extra, names = entries[1]
    entries[1] = (header, extra + bytes(range(256)) * 6 + bytes(500), names)


@pytest.mark.parametrize("mutate", [_incomplete_entry, _too_much_extra_data])
def test_snapshot_table_repairs_like_qemu(
    mutate: Callable[[list[tuple[bytes, bytes, bytes]]], None], tmp_path: Path
) -> None:
    src = tmp_path / "src" / "img.qcow2"
    src.parent.mkdir()
    make(src, "1M", "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", src)
    qemu_img("snapshot", "-c", "s2", src)
    _offset, entries = _snapshot_entries(src.read_bytes())
    mutate(entries)
    _rewrite_snapshot_table(src, entries)
    for mode in ([], ["-r", "leaks"], ["-r", "all"]):
        qdir, odir = twin(src, tmp_path / ("-".join(mode) or "check"))
        ref, got = both(qdir, odir, "check", *mode, src.name)
        assert got == ref, mode
        if mode:
            assert_same_after_repair(qdir / src.name, odir / src.name)
    assert got[0] == 0  # -r all rewrote the snapshot table
    info = json.loads(qemu_img("info", "--output=json", odir / src.name).stdout)
    assert [s["name"] for s in info["snapshots"]] == ["s1", "s2"]


def test_shared_l2_table_and_overflowing_refcounts_like_qemu(tmp_path: Path) -> None:
    """20 L1 entries share one L2 table whose 30 entries share one data cluster: with
    4-bit refcounts most references overflow, and QEMU prints each overflow in order."""
    src = tmp_path / "src" / "img.qcow2"
    src.parent.mkdir()
    make(src, "10G", "write -P 1 0 64k", opts="refcount_bits=4")
    lay = Layout.read(src)
    l1_entry = lay.u64(lay.l1_entry(0))
    data = lay.u64(lay.l2_entry(0))
    for i in range(1, 20):
        lay.poke64(lay.l1_entry(i), l1_entry)
    for j in range(1, 30):
        lay.poke64(lay.l2_table() + 8 * j, data)
    for mode in ([], ["-r", "leaks"], ["-r", "all"]):
        qdir, odir = twin(src, tmp_path / ("-".join(mode) or "check"))
        ref, got = both(qdir, odir, "check", *mode, src.name)
        assert got == ref, mode
        # 585 for the data cluster and 5 for the L2 table, once per pass (a repair that
        # fixed something is followed by a second pass).
        passes = 2 if mode == ["-r", "all"] else 1
        assert got[2].count("ERROR: overflow cluster offset=") == 590 * passes
        if mode:
            assert_same_after_repair(qdir / src.name, odir / src.name)


# -- tables that run past the end of the file -------------------------------------------------


def _poke_header(path: Path, offset: int, fmt: str, *values: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _l1_far_past_eof(lay: Layout) -> None:
    """An L1 table of 2^21 entries (16 MiB) that starts 1 TiB past the end."""
    _poke_header(lay.path, 36, ">IQ", 1 << 21, 1 << 40)


def _reftable_past_eof(lay: Layout) -> None:
    """The refcount table starts 1 TiB past the end."""
    _poke_header(lay.path, 48, ">QI", 1 << 40, 1)


def _l1_over_data_past_eof(lay: Layout) -> None:
    """An L1 table of 2^21 entries that starts on 128 KiB of random guest data and
    runs 15 MiB past the end: tens of thousands of garbage entries to report."""
    data = lay.u64(lay.l2_entry(0)) & 0x00FF_FFFF_FFFF_FE00
    with lay.path.open("r+b") as f:
        f.seek(data)
        f.write(random.Random(0).randbytes(2 * lay.cluster_size))
    _poke_header(lay.path, 36, ">IQ", 1 << 21, data)


HOSTILE_TABLES = {
    "L1 table far past EOF": _l1_far_past_eof,
    "refcount table past EOF": _reftable_past_eof,
    "L1 table over data, past EOF": _l1_over_data_past_eof,
}


@pytest.mark.parametrize("poke", list(HOSTILE_TABLES))
def test_tables_past_eof_stop_early_like_qemu(
    poke: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header whose tables claim far more than the file holds: the same outcome as
    qemu-img (status, counts, messages), and no more read than the file holds."""
    from qcowlib.core.hostfile import HostFile

    src = tmp_path / "src" / "img.qcow2"
    src.parent.mkdir()
    HOSTILE_TABLES[poke](_base(src))
    qdir, odir = twin(src, tmp_path)
    ref, got = both(qdir, odir, "check", "--output=json", src.name)
    assert got == ref
    assert ref[0] in (1, 2)

    reads: list[tuple[int, int]] = []
    pread = HostFile.pread

    def counting(self: HostFile, offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return pread(self, offset, length)

    monkeypatch.setattr(HostFile, "pread", counting)
    size = src.stat().st_size
    report = check(str(odir / src.name))
    assert report.status == ref[0]
    assert sum(n for _o, n in reads) <= 2 * size
    assert all(offset < size for offset, _n in reads)


# -- randomized differential corruptions ------------------------------------------------------


def _fuzz_targets(lay: Layout) -> list[int]:
    """File offsets of L1, L2 and refcount table entries (8 bytes each)."""
    d = lay.path.read_bytes()
    l1_size = struct.unpack_from(">I", d, 36)[0]
    targets = [lay.l1_entry(i) for i in range(l1_size)]
    for i in range(l1_size):
        table = lay.l2_table(i)
        if table and table + lay.cluster_size <= len(d):
            targets += range(table, table + lay.cluster_size, 8)
    targets += range(lay.reftable_offset, lay.reftable_offset + lay.cluster_size, 8)
    return targets


@pytest.mark.parametrize("seed", range(12))
def test_random_corruptions_like_qemu(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    src = tmp_path / "src" / "img.qcow2"
    src.parent.mkdir()
    opts = rng.choice(
        [
            "",
            "cluster_size=4096",
            "refcount_bits=1,cluster_size=4096",
            "extended_l2=on",
            "refcount_bits=64,cluster_size=512",
        ]
    )
    make(src, "1M", "write -P 1 0 40k", "write -c -P 2 256k 64k", "write -P 3 600k 8k", opts=opts)
    if "refcount_bits=1" not in opts:  # a 1-bit refcount cannot count a snapshot
        qemu_img("snapshot", "-c", "s1", src)
        subprocess.run(
            ["qemu-io", "-c", "write -P 4 0 4k", str(src)], check=True, capture_output=True
        )
    lay = Layout.read(src)
    targets = _fuzz_targets(lay)
    clusters = -(-src.stat().st_size // lay.cluster_size)
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(targets)
        old = lay.u64(where)
        lay.poke64(
            where,
            rng.choice(
                [
                    0,
                    old ^ (1 << 63),
                    old ^ (1 << 62),
                    old ^ 1,
                    old | 0x200,
                    old + lay.cluster_size,
                    (1 << 63) | rng.randrange(clusters) * lay.cluster_size,
                    rng.getrandbits(64),
                ]
            ),
        )
    for mode in ([], ["-r", "leaks"], ["-r", "all"]):
        qdir, odir = twin(src, tmp_path / ("-".join(mode) or "check"))
        ref, got = both(qdir, odir, "check", *mode, "--output=json", src.name)
        assert got == ref, mode
        if mode:
            assert_same_after_repair(qdir / src.name, odir / src.name)


# -- formats and bad input ------------------------------------------------------------------


def test_raw_has_nothing_to_check(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 1024 * 1024)
    assert qemu_img("check", raw, check=False).returncode == 63
    status, out, err = ours(tmp_path, "check", "disk.raw")
    assert (status, out) == (63, "")
    assert err.count("\n") == 1 and "nothing to check" in err
    with pytest.raises(CheckNotSupported):
        check(str(raw))


@pytest.mark.parametrize(
    "content",
    [
        b"QFI\xfb",
        b"QFI\xfb\0\0\0\x03" + b"\xff" * 200,
        b"QFI\xfb\0\0\0\x07" + b"\0" * 200,
        bytes(range(256)) * 4,
    ],
    ids=["truncated", "garbage-v3", "bad-version", "garbage"],
)
def test_bad_files_fail_with_one_error_line(content: bytes, tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(content)
    ref = qemu(tmp_path, "check", "-f", "qcow2", "bad.qcow2")
    assert ref[0] == 1
    res = subprocess.run(
        [sys.executable, "-m", "qcowlib", "check", "-f", "qcow2", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.startswith("qcowlib: error: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr


def test_truncated_image_data_like_qemu(tmp_path: Path) -> None:
    """Cut into the data: the references past the end are corruptions, as for qemu."""
    src = tmp_path / "src" / "img.qcow2"
    src.parent.mkdir()
    _base(src)
    with src.open("r+b") as f:
        f.truncate(300_000)
    qdir, odir = twin(src, tmp_path)
    ref, got = both(qdir, odir, "check", src.name)
    assert got == ref and got[0] == 2


def test_missing_file_and_missing_backing(tmp_path: Path) -> None:
    status, _out, err = ours(tmp_path, "check", "nosuch.qcow2")
    assert status == 1 and err.count("\n") == 1
    make(tmp_path / "base.qcow2", "1M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2"
    )
    (tmp_path / "base.qcow2").unlink()
    assert qemu(tmp_path, "check", "top.qcow2")[0] == 1
    status, _out, err = ours(tmp_path, "check", "top.qcow2")
    assert status == 1 and err.count("\n") == 1


def test_report_json_keys_and_human_text(tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    make(path, "1M", "write -P 1 0 64k")
    report = check(str(path))
    assert list(report.to_json()) == [
        "image-end-offset",
        "total-clusters",
        "check-errors",
        "allocated-clusters",
        "filename",
        "format",
    ]
    ref = qemu(tmp_path, "check", "img.qcow2")
    assert (report.status, report.human()) == (ref[0], ref[1])
    assert report.human().startswith("No errors were found on the image.\n1/16 = 6.25%")
    assert report.status == 0 and report.messages == ()
