"""A signal at any write of an in-place change (snapshot, amend, bitmap) leaves the
image consistent.

The command line turns SIGINT, SIGTERM and SIGHUP into an exception
(:mod:`qcowlib.core.interrupt`); in-place writers must hold it back until the image is
whole again.  Here the signal handler itself is called from inside each write in turn
(the N-th ``pwrite`` of the operation), which is exactly where a real signal lands, and
``qemu-img check`` must find the image clean afterwards, showing the disk either as it
was before the change or after it.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qcowlib
from qcowlib.core import hostfile, interrupt
from tests.conftest import qemu_img, require_qemu


@pytest.fixture(autouse=True)
def _fresh_interrupt_state() -> Iterator[None]:
    saved = vars(interrupt._state).copy()
    yield
    vars(interrupt._state).update(saved)


def content(path: Path) -> str:
    raw = path.with_suffix(".raw")
    qemu_img("convert", "-O", "raw", path, raw)
    digest = hashlib.sha1(raw.read_bytes()).hexdigest()
    raw.unlink()
    return digest


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small clusters and scattered data with snapshot s0 of another content: snapshot
    and refcount changes write many tables."""
    require_qemu()
    path = tmp_path_factory.mktemp("inplace") / "golden.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "4M")
    writes = [a for i in range(0, 4 << 20, 128 << 10) for a in ("-c", f"write -P 7 {i} 1k")]
    subprocess.run(["qemu-io", "-f", "qcow2", *writes, str(path)], check=True, capture_output=True)
    qemu_img("snapshot", "-c", "s0", path)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 256k", str(path)],
        check=True,
        capture_output=True,
    )
    return path


OPERATIONS: dict[str, Callable[[Path], None]] = {
    "snapshot-apply": lambda p: qcowlib.apply_snapshot(p, "s0"),
    "snapshot-create": lambda p: qcowlib.create_snapshot(p, "s1"),
    "snapshot-delete": lambda p: qcowlib.delete_snapshot(p, "s0"),
    "amend-refcount-bits": lambda p: qcowlib.amend(p, {"refcount_bits": "4"}),
    "amend-two-steps": lambda p: qcowlib.amend(p, {"refcount_bits": "64", "lazy_refcounts": "on"}),
    "bitmap-add": lambda p: qcowlib.bitmap(p, "b0", [("add", None)]),
}


def _signal_at_write(n: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the ``n``-th host write deliver SIGHUP through the CLI's handler first."""
    calls = [0]
    real = hostfile.HostFile.pwrite

    def pwrite(self: hostfile.HostFile, offset: int, data: memoryview | bytes) -> None:
        calls[0] += 1
        if calls[0] == n:
            interrupt._handler(signal.SIGHUP, None)
        real(self, offset, data)

    monkeypatch.setattr(hostfile.HostFile, "pwrite", pwrite)
    return calls


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_a_signal_at_any_write_leaves_the_image_consistent(
    name: str, golden: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    operation = OPERATIONS[name]
    done = tmp_path / "done.qcow2"
    shutil.copyfile(golden, done)
    with monkeypatch.context() as m:
        writes = _signal_at_write(0, m)
        operation(done)
    allowed = {content(golden), content(done)}
    assert writes[0] > 1
    for n in range(1, writes[0] + 1):
        image = tmp_path / f"at-{n}.qcow2"
        shutil.copyfile(golden, image)
        vars(interrupt._state).update(raised=False, pending=None, defer_depth=0)
        with monkeypatch.context() as m, pytest.raises(interrupt.Interrupted):
            _signal_at_write(n, m)
            operation(image)
        check = qemu_img("check", image, check=False)
        assert check.returncode == 0, f"signal at write {n}: {check.stdout}{check.stderr}"
        assert content(image) in allowed, f"signal at write {n}"
        image.unlink()
