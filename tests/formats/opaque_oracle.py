"""qemu-img as the judge of the read-only formats without allocation data (bochs, cloop, dmg).

:func:`assert_reads_like_qemu` reads an image with qcowlib (format probed from content)
and with ``qemu-img``, and compares the whole disk, ``info`` and ``map`` in JSON and in
human form.  :func:`expect_refused` opens and reads a bad image and checks that it ends in
one :class:`QcowlibError`, also through the CLI (exit 1, one error line, no traceback).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qcowlib.errors import QcowlibError
from qcowlib.formats.opener import open_disk
from tests.conftest import cli, qemu_img

#: Where optional sample images made by other tools are looked for (QEMU's
#: tests/qemu-iotests/sample_images, decompressed); never committed.
SAMPLES = Path(os.environ.get("QCOWLIB_SAMPLE_IMAGES", Path.home() / ".cache/qcowlib-samples"))


def sample(name: str) -> Path:
    """A sample image from :data:`SAMPLES`, or skip the test without it."""
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"sample image {name} not in {SAMPLES} (QEMU's sample_images)")
    return path


def read_all(path: Path, fmt: str | None = None) -> tuple[str, bytes]:
    """Format and whole guest disk as qcowlib reads them."""
    with open_disk(str(path), fmt) as disk:
        return disk.format, disk.read(0, disk.virtual_size)


def qemu_raw(path: Path, fmt: str) -> bytes:
    out = path.with_name(path.name + ".qemu.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def assert_reads_like_qemu(path: Path, fmt: str, expected: bytes | None = None) -> bytes:
    """qcowlib and qemu-img agree on ``path``: content, info and map (JSON and human).

    ``expected`` is the disk the test built the image from, where known.  Returns the
    disk's bytes.
    """
    found, ours = read_all(path)
    assert found == fmt
    checked = cli("validate", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert ours == qemu_raw(path, fmt)
    if expected is not None:
        assert ours == expected
    for command in ("info", "map"):
        theirs = qemu_img(command, "-f", fmt, "--output=json", path)
        mine = cli(command, "--output=json", path)
        assert mine.returncode == 0, mine.stderr
        assert json.loads(mine.stdout) == json.loads(theirs.stdout)
        theirs = qemu_img(command, "-f", fmt, path, check=False)
        mine = cli(command, path)
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
        if theirs.returncode:
            # Human ``map`` refuses data that has no offset, in the same words.
            message = theirs.stderr.strip().splitlines()[-1].removeprefix("qemu-img: ")
            assert mine.stderr.strip() == f"qcowlib: error: {message}"
    return ours


def assert_converts(path: Path, tmp: Path, fmt: str) -> None:
    """``convert -O qcow2`` and ``flatten`` from ``path`` give the same disk (qemu-img
    compare against the source, read by qemu-img)."""
    for command, out in (("convert", tmp / "out.qcow2"), ("flatten", tmp / "flat.qcow2")):
        args: list[str | Path] = [command, path, out]
        if command == "convert":
            args[1:1] = ["-O", "qcow2"]
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert qemu_img("check", out, check=False).returncode == 0
        cmp = qemu_img("compare", "-f", fmt, "-F", "qcow2", path, out, check=False)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def expect_refused(path: Path, fmt: str, error: type[QcowlibError] = QcowlibError) -> str:
    """Opening and reading ``path`` as ``fmt`` raises ``error``; the CLI says so on one
    line and exits 1; ``validate`` rejects what opening refuses.  Returns the message."""
    with pytest.raises(error) as exc:
        read_all(path, fmt)
    done = cli("convert", "-f", fmt, "-O", "raw", path, path.with_name("refused.raw"))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowlib: error: "), done.stderr
    assert "Traceback" not in done.stderr
    try:
        open_disk(str(path), fmt).close()
    except QcowlibError:
        # Refused on open: validate (never laxer than opening) refuses it too.
        checked = cli("validate", "-f", fmt, path)
        assert checked.returncode == 1, checked.stdout + checked.stderr
        assert "Traceback" not in checked.stderr
    return str(exc.value)


def check_random_reads(path: Path, expected: bytes, reads: list[tuple[int, int]]) -> None:
    """Reads at any offset and length (sub-sector, across blocks) give ``expected``."""
    with open_disk(str(path)) as disk:
        size = disk.virtual_size
        assert size == len(expected)
        for offset, length in reads:
            offset %= size + 1
            length = min(length, size - offset)
            assert disk.read(offset, length) == expected[offset : offset + length]
