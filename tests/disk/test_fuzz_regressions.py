"""Inputs a mutation fuzzer found: each gives a QcowlibError (CLI: one line, exit 1).

The fuzzer (``tools/fuzz``) mutates images of every format that qemu-img made and runs
info, map, read, check, validate and convert on them; anything but a QcowlibError, or a
hang, is a defect.  Each case here rebuilds the damaged field by hand.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcowlib
from tests.conftest import qemu_img

L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcowlib", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def compressed_qcow2(tmp_path: Path) -> Path:
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", plain, "1M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(plain)],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", plain, out)
    return out


def test_compressed_cluster_at_offset_zero(tmp_path: Path) -> None:
    path = compressed_qcow2(tmp_path)
    with path.open("r+b") as f:
        f.seek(40)
        (l1_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset)
        (l1,) = struct.unpack(">Q", f.read(8))
        l2_offset = l1 & L2_OFFSET_MASK
        f.seek(l2_offset)
        (entry,) = struct.unpack(">Q", f.read(8))
        assert entry & (1 << 62), "first cluster should be compressed"
        x = 62 - (12 - 8)  # cluster_bits 12: host offset in bits 0..x-1
        f.seek(l2_offset)
        f.write(struct.pack(">Q", entry & ~((1 << x) - 1)))
    # qemu-img fails to read it too.
    assert qemu_img("convert", "-O", "raw", path, tmp_path / "q.raw", check=False).returncode
    with qcowlib.open(str(path)) as disk, pytest.raises(qcowlib.CorruptImage):
        disk.read(0, 4096)
    res = run_cli("convert", "-O", "raw", path, tmp_path / "o.raw")
    assert res.returncode == 1
    assert res.stderr.startswith("qcowlib: error: ") and "compressed cluster" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("repair", ["leaks", "all"])
def test_repair_of_an_image_with_no_l2_table(tmp_path: Path, repair: str) -> None:
    """`check -r all` of a new, empty qcow2 (an L1 table of zeros) failed with an internal
    IndexError; it must answer as qemu-img does."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for path in (ours, theirs):
        qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    res = run_cli("check", "-r", repair, "--output", "json", ours)
    ref = qemu_img("check", "-r", repair, "--output", "json", theirs, check=False)
    assert (res.returncode, res.stderr) == (ref.returncode, "")
    assert json.loads(res.stdout) | {"filename": ""} == json.loads(ref.stdout) | {"filename": ""}
    assert ours.read_bytes() == theirs.read_bytes()


def test_snapshot_of_an_image_pointing_far_past_its_end(tmp_path: Path) -> None:
    """An L2 entry pointing petabytes out made `snapshot -c` try to allocate a refcount
    table of hundreds of GiB; it fails as qemu-img does (EFBIG, past QCOW_MAX_REFTABLE_SIZE)."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", ours, "1M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4k", str(ours)],
        check=True,
        capture_output=True,
    )
    with ours.open("r+b") as f:
        f.seek(40)
        (l1_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset)
        (l1,) = struct.unpack(">Q", f.read(8))
        f.seek(l1 & L2_OFFSET_MASK)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 50)))  # COPIED, 1 PiB out
    theirs.write_bytes(ours.read_bytes())
    ref = qemu_img("snapshot", "-c", "s", theirs, check=False)
    assert ref.returncode == 1 and "File too large" in ref.stderr
    with pytest.raises(qcowlib.QcowlibError) as err:
        qcowlib.create_snapshot(ours, "s")
    assert "8 MiB" in str(err.value)
    res = run_cli("snapshot", "-c", "s2", ours)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("qcowlib: error: ")
