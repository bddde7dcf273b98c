"""The image itself (not a file it names) is a FIFO, a character device or a block device.

A FIFO named on the command line made every reading command wait for ever for a writer
(qemu-img hangs there too); ``checksum`` of a character device read ``/dev/zero`` for
ever; an image on a block device (an LVM volume, as Cinder and oVirt keep qcow2
images) was read as an empty raw disk, because ``st_size`` of a block device is 0.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcowlib
from tests.conftest import cli, qemu_img, qemu_io

READERS = (
    ["info"],
    ["map"],
    ["check"],
    ["checksum"],
    ["compare", "/dev/null"],
    ["convert", "-O", "raw"],
)


@pytest.mark.parametrize("command", READERS, ids=lambda c: c[0])
def test_a_fifo_is_refused_not_waited_on(tmp_path: Path, command: list[str]) -> None:
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    args: list[str | Path] = [*command, fifo]
    if command[0] == "convert":
        args.append(tmp_path / "out.raw")
    res = subprocess.run(
        ["timeout", "20", *map(str, cli_argv(*args))], check=False, capture_output=True, text=True
    )
    assert res.returncode == (2 if command[0] == "compare" else 1), res.stderr
    assert res.stderr.endswith("is a FIFO, not a disk image\n"), res.stderr
    assert res.stderr.count("\n") == 1
    assert not (tmp_path / "out.raw").exists()


def cli_argv(*args: str | Path) -> list[str | Path]:
    import sys

    return [sys.executable, "-m", "qcowlib", *args]


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """A hang becomes a failure (a blocking open is interrupted by the signal)."""

    def ring(signum: int, frame: object) -> None:
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_through_the_api(tmp_path: Path) -> None:
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    with alarm(10), pytest.raises(qcowlib.QcowlibError, match="FIFO"):
        qcowlib.info(fifo)
    with alarm(10), pytest.raises(qcowlib.QcowlibError, match="FIFO"):
        qcowlib.checksum(fifo)


def test_a_character_device_is_an_empty_raw_disk_as_in_qemu_img() -> None:
    """``/dev/zero`` never ends: it is hashed as far as its size (0), as qemu-img and
    the readers see it, instead of for ever."""
    ref = qemu_img("info", "--output=json", "/dev/zero")
    assert '"virtual-size": 0' in ref.stdout
    with alarm(10):
        sums = qcowlib.checksum("/dev/zero", algos=("md5",), content=True)
    assert sums["size"] == 0
    assert sums["file"]["md5"] == sums["content"]["md5"] == "d41d8cd98f00b204e9800998ecf8427e"


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """A loop device over ``backing`` (skips where they cannot be set up)."""
    losetup = shutil.which("losetup")
    if losetup is None or os.geteuid() != 0:
        pytest.skip("needs root and losetup for a block device")
    made = subprocess.run(
        [losetup, "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if made.returncode:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "-d", device], check=False)


@pytest.mark.usefixtures("qemu")
def test_a_qcow2_on_a_block_device_reads_as_qemu_img_reads_it(tmp_path: Path) -> None:
    image = tmp_path / "lv.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    qemu_io(image, "qcow2", "write -P 0x5a 0 1M", "write -P 7 60M 64k")
    os.truncate(image, 8 << 20)  # a volume larger than the image on it
    with loop_device(image) as device:
        ref = qemu_img("info", "--output=json", device)
        ours = cli("info", "--output=json", device)
        assert ours.returncode == 0, ours.stderr
        for key in ('"format": "qcow2"', '"virtual-size": 67108864'):
            assert key in ref.stdout and key in ours.stdout
        qemu_img("convert", "-O", "raw", device, tmp_path / "q.raw")
        res = cli("convert", "-O", "raw", device, tmp_path / "o.raw")
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
        raw = cli("info", "-f", "raw", "--output=json", device)
        assert '"virtual-size": 8388608' in raw.stdout
        assert qcowlib.checksum(device, algos=("md5",))["size"] == 8 << 20
