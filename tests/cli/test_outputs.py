"""Writing over existing files, as qemu-img does it, and I/O errors that say why.

qemu-img truncates an existing output in place, so its mode and owner stay and a
symlink is written through; qcowlib writes a temporary file and renames it, and must
end the same way (contract: "Backing files, locks, outputs").  Each case runs qemu-img
and qcowlib on identical set-ups and compares the results.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli, qemu_img, qemu_io, require_qemu

OWNER = (1234, 2345)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    require_qemu()
    path = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io(path, "qcow2", "write -P 0x5a 0 3M")
    return path


def _write(tool: str, command: str, src: Path, dst: Path) -> subprocess.CompletedProcess[str]:
    """The same write done by qemu-img or qcowlib (flatten's counterpart is convert)."""
    if command == "create":
        args: list[str | Path] = ["create", "-f", "qcow2", dst, "4M"]
    elif command == "flatten" and tool == "qcowlib":
        args = ["flatten", src, dst]
    else:
        args = ["convert", "-O", "qcow2", src, dst]
    if tool == "qemu-img":
        return qemu_img(*args)
    return cli(*args)


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


COMMANDS = ["convert", "create", "flatten"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_overwrite_keeps_mode_as_qemu_img(
    src: Path, tmp_path: Path, command: str, mode: int
) -> None:
    result = {}
    for tool in ("qemu-img", "qcowlib"):
        dst = tmp_path / f"{tool}.out"
        dst.write_bytes(b"old content")
        dst.chmod(mode)
        res = _write(tool, command, src, dst)
        assert res.returncode == 0, res.stderr
        result[tool] = _identity(dst)
    assert result["qcowlib"] == result["qemu-img"]
    assert result["qcowlib"][0] == mode


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_keeps_owner_as_qemu_img(src: Path, tmp_path: Path, command: str) -> None:
    result = {}
    for tool in ("qemu-img", "qcowlib"):
        dst = tmp_path / f"{tool}.out"
        dst.write_bytes(b"old content")
        os.chown(dst, *OWNER)
        dst.chmod(0o600)
        res = _write(tool, command, src, dst)
        assert res.returncode == 0, res.stderr
        result[tool] = _identity(dst)
    assert result["qcowlib"] == result["qemu-img"] == (0o600, *OWNER)


@pytest.mark.parametrize("command", COMMANDS)
def test_symlink_is_written_through_as_qemu_img(src: Path, tmp_path: Path, command: str) -> None:
    """The link stays a link; its target (in another directory) gets the image and
    keeps its mode; nothing else appears in either directory."""
    for tool in ("qemu-img", "qcowlib"):
        work = tmp_path / tool
        (work / "images").mkdir(parents=True)
        target = work / "images" / "disk.qcow2"
        target.write_bytes(b"old content")
        target.chmod(0o640)
        link = work / "link.qcow2"
        link.symlink_to("images/disk.qcow2")
        res = _write(tool, command, src, link)
        assert res.returncode == 0, res.stderr
        assert link.is_symlink() and os.readlink(link) == "images/disk.qcow2"
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        assert sorted(os.listdir(work)) == ["images", "link.qcow2"]
        assert os.listdir(work / "images") == ["disk.qcow2"]
        assert qemu_img("check", "-q", target, check=False).returncode == 0
    if command != "create":
        assert qemu_img("compare", "-q", src, tmp_path / "qcowlib" / "link.qcow2").returncode == 0


def test_dangling_symlink_creates_its_target_as_qemu_img(src: Path, tmp_path: Path) -> None:
    for tool in ("qemu-img", "qcowlib"):
        work = tmp_path / tool
        (work / "sub").mkdir(parents=True)
        (work / "link").symlink_to("sub/new.qcow2")
        res = _write(tool, "convert", src, work / "link")
        assert res.returncode == 0, res.stderr
        assert (work / "link").is_symlink() and (work / "sub" / "new.qcow2").is_file()
    modes = {
        tool: _identity(tmp_path / tool / "sub" / "new.qcow2") for tool in ("qemu-img", "qcowlib")
    }
    assert modes["qcowlib"] == modes["qemu-img"]


def test_new_file_mode_follows_umask_as_qemu_img(src: Path, tmp_path: Path) -> None:
    modes = {}
    for tool in ("qemu-img", "qcowlib"):
        dst = tmp_path / f"{tool}.out"
        cmd = ["qemu-img"] if tool == "qemu-img" else [sys.executable, "-m", "qcowlib"]
        res = subprocess.run(
            ["sh", "-c", 'umask 027 && exec "$@"', "sh", *cmd, "convert", "-O", "qcow2",
             str(src), str(dst)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        modes[tool] = stat.S_IMODE(dst.stat().st_mode)
    assert modes["qcowlib"] == modes["qemu-img"] == 0o640


# -- I/O errors say why ---------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "-O", "raw"],
        ["convert", "-O", "raw", "-S", "0"],
        ["convert", "-O", "qcow2"],
        ["convert", "-c", "-O", "qcow2"],
        ["convert", "-O", "vmdk"],
        ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"],
        ["convert", "-O", "vdi"],
        ["convert", "-O", "vpc"],
        ["convert", "-O", "vhdx"],
        ["flatten", "-O", "raw"],
        ["flatten", "-O", "vmdk"],
    ],
    ids=lambda a: "-".join(x.strip("-") for x in a),
)
def test_disk_full_says_why(src: Path, small_fs: Path, args: list[str]) -> None:
    """A full file system: one line naming the output and the system's reason (as
    qemu-img says "No space left on device"), and no temporary file left."""
    big = src.parent / "big.raw"
    big.write_bytes(os.urandom(6 << 20))  # does not compress into 1 MiB either
    dst = small_fs / "out.img"
    res = cli(*args, "-f", "raw", big, dst)
    assert res.returncode == 1
    assert res.stderr.startswith(f"qcowlib: error: {dst}: ")
    assert "No space left on device" in res.stderr and "None" not in res.stderr
    assert res.stderr.count("\n") == 1
    assert os.listdir(small_fs) == []


def test_create_on_a_full_file_system_says_why(small_fs: Path) -> None:
    res = cli("create", "-f", "raw", "-o", "preallocation=full", small_fs / "new.raw", "4M")
    assert res.returncode == 1 and "No space left on device" in res.stderr, res.stderr
    assert os.listdir(small_fs) == []


def test_stdout_on_a_full_device_says_why(src: Path) -> None:
    """``flatten SRC -`` into /dev/full (writes fail with ENOSPC)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "wb") as full:
        res = subprocess.run(
            [sys.executable, "-m", "qcowlib", "flatten", str(src), "-"],
            stdout=full, stderr=subprocess.PIPE, text=True, check=False,
        )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr == "qcowlib: error: cannot write to stdout: No space left on device\n"


def test_wrapped_io_errors_keep_the_reason() -> None:
    """A format writer that wraps a write error again still has the system's text."""
    from qcowlib.core.hostfile import pwrite_all
    from qcowlib.errors import QcowlibIOError

    fd = os.open("/dev/full", os.O_WRONLY) if os.path.exists("/dev/full") else -1
    if fd < 0:
        pytest.skip("no /dev/full")
    try:
        with pytest.raises(QcowlibIOError) as info:
            pwrite_all(fd, b"x" * 4096, 0)
    finally:
        os.close(fd)
    assert info.value.strerror == "No space left on device"
    again = QcowlibIOError(f"write error: {info.value.strerror}", errno=info.value.errno)
    assert str(again) == "write error: No space left on device"
