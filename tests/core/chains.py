"""Helpers for backing-chain tests: chains built fast, special files, a qemu-io holder."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from tests.conftest import qemu_img, qemu_io


def make_chain(directory: Path, depth: int, *, size: str = "1M") -> Path:
    """A ``depth``-image qcow2 chain ``l0000`` <- ``l0001`` <- ...; returns the top.

    qemu-img makes the base and one overlay; the other overlays are that overlay's bytes
    with the (same-length) backing name changed, so a 1,000-deep chain takes well under
    a second.  A few layers get data of their own (pattern = layer number + 1).
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / "l0000.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, size)
    qemu_io(base, "qcow2", "write -P 1 0 64k", "write -P 1 512k 4k")
    if depth == 1:
        return base
    tmpl = directory / "template.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "l0000.qcow2", "-F", "qcow2", tmpl, size)
    data = tmpl.read_bytes()
    tmpl.unlink()
    assert data.count(b"l0000.qcow2") == 1
    for i in range(1, depth):
        name = f"l{i - 1:04d}.qcow2".encode()
        (directory / f"l{i:04d}.qcow2").write_bytes(data.replace(b"l0000.qcow2", name))
    for i in sorted({depth // 3, depth // 2, depth - 1} - {0}):
        qemu_io(directory / f"l{i:04d}.qcow2", "qcow2", f"write -P {i % 250 + 1} {i % 200 * 4}k 4k")
    return directory / f"l{depth - 1:04d}.qcow2"


def overlay(path: Path, backing: str, backing_fmt: str | None = "raw", size: str = "1M") -> Path:
    """A qcow2 overlay naming ``backing`` without opening it (``-u``); with
    ``backing_fmt`` None the backing format extension is blanked out afterwards."""
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_fmt or "raw", path, size
    )
    if backing_fmt is None:
        data = bytearray(path.read_bytes())
        at = data.find(b"\xe2\x79\x2a\xca")  # the backing format header extension
        assert 0 < at < 4096
        data[at : at + 4] = b"\x12\x34\x56\x78"  # an unknown extension: ignored
        path.write_bytes(bytes(data))
    return path


def vmdk_descriptor(path: Path, extent: str, sectors: int = 2048) -> Path:
    """A monolithicFlat VMDK descriptor whose one extent is the file ``extent``."""
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        f'RW {sectors} FLAT "{extent}" 0\n\n# The Disk Data Base\n#DDB\n'
        'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\n'
        'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n'
    )
    return path


def special_files(directory: Path) -> dict[str, str]:
    """Files that must never be opened as backing, data or extent files, by kind."""
    fifo = directory / "fifo"
    os.mkfifo(fifo)
    sock_path = directory / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    sock.close()  # the socket file stays
    (directory / "subdir").mkdir()
    return {
        "/dev/zero": "/dev/zero",
        "/dev/urandom": "/dev/urandom",
        "/proc/self/mem": "/proc/self/mem",
        "/sys/kernel/profiling": "/sys/kernel/profiling",
        "fifo": str(fifo),
        "socket": str(sock_path),
        "directory": str(directory / "subdir"),
    }


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def held_by_qemu_io(path: Path, fmt: str = "qcow2", *, read_only: bool = False) -> Iterator[None]:
    """``qemu-io`` holding ``path`` open (for writing unless ``read_only``), as a VM would."""
    args = ["qemu-io", "-f", fmt, *(["-r"] if read_only else []), str(path)]
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"read 0 512\n")
        proc.stdin.flush()
        line = proc.stdout.readline()  # "read 512/512 bytes ..." once it is really open
        assert b"read 512/512" in line, line
        yield
    finally:
        proc.communicate(b"quit\n", timeout=30)
