"""``snapshot`` (-l -c -a -d) against qemu-img snapshot, check, compare and info."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import cli, qemu_img, qemu_json

pytestmark = pytest.mark.usefixtures("qemu")

OPTS = [
    "cluster_size=65536",
    "cluster_size=4096,compat=0.10",
    "extended_l2=on",
    "cluster_size=512",
    "refcount_bits=64,lazy_refcounts=on",
]


def io(path: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def clean(img: Path) -> None:
    res = qemu_img("check", img, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found" in res.stdout, res.stdout


def image(tmp: Path, opts: str = "cluster_size=65536", name: str = "a.qcow2") -> Path:
    img = tmp / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, "8M")
    io(img, "write -P 1 0 1M", "write -c -P 3 2M 64k", "write -z 3M 128k", "write -P 4 5M 7000")
    return img


def ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    return res


def test_list_matches_qemu_byte_for_byte(tmp_path: Path) -> None:
    img = image(tmp_path)
    assert ok("snapshot", "-l", img).stdout == ""  # no snapshots: nothing, as qemu-img
    for name in ("s1", "a much longer snapshot name", "s1"):
        qemu_img("snapshot", "-c", name, img)
    ours = ok("snapshot", "-l", img).stdout
    assert ours == qemu_img("snapshot", "-l", img).stdout
    assert ours.startswith("Snapshot list:\n")


@pytest.mark.parametrize("opts", OPTS)
def test_create_read_by_qemu(opts: str, tmp_path: Path) -> None:
    img = image(tmp_path, opts)
    before = tmp_path / "before.qcow2"
    shutil.copy(img, before)
    ok("snapshot", "-c", "first", img)
    ok("snapshot", "-c", "second", img)
    clean(img)
    snaps = qemu_json("info", img)["snapshots"]
    assert [(s["id"], s["name"]) for s in snaps] == [("1", "first"), ("2", "second")]
    assert all(s["vm-state-size"] == 0 and s["icount"] == 0 for s in snaps)
    assert ok("snapshot", "-l", img).stdout == qemu_img("snapshot", "-l", img).stdout
    # the snapshot holds the content at creation, after later writes too (COW by qemu)
    io(img, "write -P 9 0 2M", "write -P 8 4M 64k")
    clean(img)
    view = tmp_path / "view.raw"
    qemu_img("convert", "-l", "snapshot.name=first", "-O", "raw", img, view)
    assert qemu_img("compare", view, before, check=False).returncode == 0


@pytest.mark.parametrize("opts", OPTS)
def test_apply_and_delete_like_qemu(opts: str, tmp_path: Path) -> None:
    img = image(tmp_path, opts)
    before = tmp_path / "before.qcow2"
    shutil.copy(img, before)
    qemu_img("snapshot", "-c", "by-qemu", img)
    io(img, "write -P 7 512k 1M")
    ok("snapshot", "-c", "ours", img)
    after = tmp_path / "after.qcow2"
    shutil.copy(img, after)
    io(img, "write -P 6 0 3M", "discard 5M 64k")
    ok("snapshot", "-a", "by-qemu", img)  # a snapshot qemu-img made
    clean(img)
    assert qemu_img("compare", img, before, check=False).returncode == 0
    ok("snapshot", "-a", "2", img)  # by ID
    clean(img)
    assert qemu_img("compare", img, after, check=False).returncode == 0
    ok("snapshot", "-d", "by-qemu", img)
    clean(img)
    assert [s["name"] for s in qemu_json("info", img)["snapshots"]] == ["ours"]
    ok("snapshot", "-d", "ours", img)
    clean(img)
    assert "snapshots" not in qemu_json("info", img)
    assert qemu_img("compare", img, after, check=False).returncode == 0


def test_our_writer_copies_on_write_after_our_snapshot(tmp_path: Path) -> None:
    import qcowlib

    img = image(tmp_path)
    before = tmp_path / "before.qcow2"
    shutil.copy(img, before)
    ok("snapshot", "-c", "s", img)
    with qcowlib.open_rw(str(img)) as disk:
        disk.write(4096, b"\x55" * 100_000)
        disk.write_zeroes(2 * 1024 * 1024, 65536)
    clean(img)
    view = tmp_path / "view.raw"
    qemu_img("convert", "-l", "snapshot.name=s", "-O", "raw", img, view)
    assert qemu_img("compare", view, before, check=False).returncode == 0
    ok("snapshot", "-a", "s", img)
    clean(img)
    assert qemu_img("compare", img, before, check=False).returncode == 0


def test_apply_restores_the_snapshot_size(tmp_path: Path) -> None:
    img = image(tmp_path)
    ours = tmp_path / "ours.qcow2"
    ok("snapshot", "-c", "small", img)
    qemu_img("resize", img, "20M")
    io(img, "write -P 5 15M 64k")
    shutil.copy(img, ours)
    qemu_img("snapshot", "-a", "small", img)
    ok("snapshot", "-a", "small", ours)
    clean(ours)
    assert qemu_json("info", ours)["virtual-size"] == qemu_json("info", img)["virtual-size"]
    assert qemu_img("compare", ours, img, check=False).returncode == 0


def test_errors_as_qemu(tmp_path: Path) -> None:
    img = image(tmp_path)
    res = cli("snapshot", "-a", "nope", img)
    assert res.returncode == 1
    assert "Could not apply snapshot 'nope'" in res.stderr
    res = cli("snapshot", "-d", "nope", img)
    assert res.returncode == 1 and "snapshot not found" in res.stderr
    assert qemu_img("snapshot", "-d", "nope", img, check=False).returncode == 1
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(1 << 20))
    res = cli("snapshot", "-c", "x", raw)
    assert res.returncode == 1 and "Operation not supported" in res.stderr
    assert qemu_img("snapshot", "-c", "x", "-f", "raw", raw, check=False).returncode == 1
    assert cli("snapshot", "-l", raw).stdout == ""
    assert cli("snapshot", "-l", "-c", "x", img).returncode == 2  # cannot mix actions


def test_refcount_too_narrow_refused_cleanly(tmp_path: Path) -> None:
    img = image(tmp_path, "cluster_size=512,refcount_bits=1")
    res = cli("snapshot", "-c", "s", img)
    assert res.returncode == 1 and "refcount_bits=1" in res.stderr
    clean(img)  # qemu-img leaks a cluster here; nothing was written
    assert "snapshots" not in qemu_json("info", img)


def test_python_api(tmp_path: Path) -> None:
    import qcowlib

    for name in ("list_snapshots", "create_snapshot", "apply_snapshot", "delete_snapshot",
                 "SnapshotInfo", "amend", "bitmap", "dd"):  # fmt: skip
        assert name in qcowlib.__all__ and name in dir(qcowlib)
        assert getattr(qcowlib, name) is not None
    img = image(tmp_path)
    qcowlib.create_snapshot(img, "api")
    snaps = qcowlib.list_snapshots(img)
    assert [(s.id, s.name) for s in snaps] == [("1", "api")]
    assert [s.as_json() for s in snaps] == qemu_json("info", img)["snapshots"]
    qcowlib.amend(img, {"lazy_refcounts": "on"})
    qcowlib.bitmap(img, "b", [("add", None)], granularity=4096)
    assert qemu_json("info", img)["format-specific"]["data"]["bitmaps"][0]["granularity"] == 4096
    out = tmp_path / "part.raw"
    assert qcowlib.dd(img, out, bs=4096, count=16, skip=1) == 15 * 4096
    ref = tmp_path / "ref.raw"
    qemu_img("dd", "-O", "raw", f"if={img}", f"of={ref}", "bs=4096", "count=16", "skip=1")
    assert out.read_bytes() == ref.read_bytes()
    qcowlib.delete_snapshot(img, "api")
    clean(img)
    with pytest.raises(qcowlib.QcowlibError):
        qcowlib.apply_snapshot(img, "api")


OPS = st.one_of(
    st.tuples(
        st.just("write"), st.integers(0, 255 * 1024), st.integers(1, 70_000), st.integers(1, 255)
    ),
    st.tuples(st.just("zero"), st.integers(0, 255 * 1024), st.integers(1, 70_000), st.just(0)),
    st.tuples(st.just("create"), st.integers(0, 3), st.just(0), st.just(0)),
    st.tuples(st.just("apply"), st.integers(0, 3), st.just(0), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 3), st.just(0), st.just(0)),
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=st.lists(OPS, min_size=1, max_size=12), opts=st.sampled_from(OPTS))
def test_random_plans_against_a_model(
    plan: list[tuple[str, int, int, int]], opts: str, tmp_path: Path
) -> None:
    """Writes, zero writes and snapshot operations through the library, against a model
    of the disk and of every snapshot; qemu-img reads each snapshot and checks the image."""
    import qcowlib

    size = 320 * 1024
    d = tmp_path / f"plan{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    img = d / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, str(size))
    current = bytearray(size)
    snaps: dict[str, bytes] = {}
    for op, a, n, value in plan:
        if op in ("write", "zero"):
            n = min(n, size - a)
            with qcowlib.open_rw(str(img)) as disk:
                if op == "write":
                    disk.write(a, bytes([value]) * n)
                else:
                    disk.write_zeroes(a, n)
            current[a : a + n] = bytes([value]) * n
        elif op == "create" and f"s{a}" not in snaps:
            qcowlib.create_snapshot(img, f"s{a}")
            snaps[f"s{a}"] = bytes(current)
        elif op == "apply" and f"s{a}" in snaps:
            qcowlib.apply_snapshot(img, f"s{a}")
            current = bytearray(snaps[f"s{a}"])
        elif op == "delete" and f"s{a}" in snaps:
            qcowlib.delete_snapshot(img, f"s{a}")
            del snaps[f"s{a}"]
    clean(img)
    assert cli("check", img).returncode == 0  # and qcowlib's own check agrees
    out = d / "out.raw"
    qemu_img("convert", "-O", "raw", img, out)
    assert out.read_bytes() == bytes(current)
    for name, content in snaps.items():
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", img, out)
        assert out.read_bytes() == content, name


def _snapshot_name_at(img: Path) -> int:
    """File offset of snapshot 0's name (after its 40-byte header, extra data, ID)."""
    import struct

    raw = img.read_bytes()
    (table,) = struct.unpack_from(">Q", raw, 64)
    id_size, name_size = struct.unpack_from(">HH", raw, table + 12)
    (extra,) = struct.unpack_from(">I", raw, table + 36)
    assert name_size >= 2
    return int(table + 40 + extra + id_size)


def test_a_snapshot_name_that_is_not_utf8_reads_as_in_qemu_img(tmp_path: Path) -> None:
    """Another tool's snapshot name in a legacy encoding (bytes that are not UTF-8)
    made `info`, `snapshot -l` and every snapshot command fail ("undecodable name");
    qemu-img shows it (U+FFFD in JSON), and writing the table back keeps its bytes."""
    img = image(tmp_path)
    qemu_img("snapshot", "-c", "s0", img)
    at = _snapshot_name_at(img)
    with img.open("r+b") as f:
        f.seek(at)
        f.write(b"\xe9\xff")  # "é" in Latin-1, then a byte no encoding uses
    ref = qemu_json("info", img)
    ours = json.loads(ok("info", "--output=json", img).stdout)
    assert ours["snapshots"] == ref["snapshots"]
    assert ref["snapshots"][0]["name"] == "\ufffd\ufffd"
    ok("snapshot", "-l", img)
    ok("snapshot", "-c", "s1", img)
    clean(img)
    assert img.read_bytes()[_snapshot_name_at(img) :][:2] == b"\xe9\xff"
    assert [s["name"] for s in qemu_json("info", img)["snapshots"]] == ["\ufffd\ufffd", "s1"]
