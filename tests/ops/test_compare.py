"""``compare`` against ``qemu-img compare`` on pairs that differ in known ways."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_img

pytestmark = pytest.mark.usefixtures("qemu")


def io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def both(*args: str | Path) -> tuple[tuple[int, str], tuple[int, str]]:
    ours = subprocess.run(
        [sys.executable, "-m", "qcowlib", "compare", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
    )
    ref = qemu_img("compare", *args, check=False)
    return (ours.returncode, ours.stdout), (ref.returncode, ref.stdout)


def make(path: Path, size: str, *cmds: str, fmt: str = "qcow2") -> Path:
    qemu_img("create", "-q", "-f", fmt, path, size)
    if cmds:
        io(path, *cmds, fmt=fmt)
    return path


CASES = {
    "identical": (("write -P 1 0 64k",), ("write -P 1 0 64k",), "1M", "1M"),
    "byte differs": (("write -P 1 0 64k",), ("write -P 1 0 64k", "write -P 2 5000 1"), "1M", "1M"),
    "data vs hole": (("write -P 1 128k 4k",), (), "1M", "1M"),
    "zeros written vs hole": (("write -z 0 64k",), ("write -P 0 0 64k",), "1M", "1M"),
    "larger, zero tail": (("write -P 1 0 4k",), ("write -P 1 0 4k",), "1M", "2M"),
    "larger, data tail": (
        ("write -P 1 0 4k",),
        ("write -P 1 0 4k", "write -P 9 1536k 1"),
        "1M",
        "2M",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strict", [False, True])
def test_compare_like_qemu(case: str, strict: bool, tmp_path: Path) -> None:
    cmds_a, cmds_b, size_a, size_b = CASES[case]
    a = make(tmp_path / "a.qcow2", size_a, *cmds_a)
    b = make(tmp_path / "b.qcow2", size_b, *cmds_b)
    flags = ["-s"] if strict else []
    ours, ref = both(*flags, a, b)
    assert ours == ref


def test_compare_raw_against_qcow2(tmp_path: Path) -> None:
    a = make(tmp_path / "a.qcow2", "1M", "write -P 7 4096 8192")
    b = make(tmp_path / "b.raw", "1M", "write -P 7 4096 8192", fmt="raw")
    ours, ref = both("-f", "qcow2", "-F", "raw", a, b)
    assert ours == ref == (0, "Images are identical.\n")


def test_compare_error_is_status_2(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "qcowlib", "compare", str(tmp_path / "x"), str(tmp_path / "y")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("qcowlib: error: ")
