"""Differential checks shared by the tests of the read-only formats (qed, qcow,
parallels): every result is compared with what qemu-img says of the same file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import qcowlib
from tests.conftest import cli, qemu_img


def poke(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def ours_raw(path: Path) -> bytes:
    """The whole guest disk as qcowlib reads it (format probed, chain followed)."""
    with qcowlib.open(str(path)) as disk:
        return disk.read(0, disk.virtual_size)


def qemu_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".ref.raw")
    qemu_img("convert", "-O", "raw", path, out)
    return out.read_bytes()


def assert_reads_like_qemu(path: Path, tmp: Path) -> None:
    assert ours_raw(path) == qemu_raw(path, tmp)


def assert_info_and_map_like_qemu(path: Path, *, chain: bool = False) -> None:
    """``info`` and ``map``, JSON and human, byte for byte as qemu-img prints them."""
    runs = [
        ("info", "--output", "json"),
        ("info",),
        ("map", "--output", "json"),
    ]
    if chain:
        runs.append(("info", "--backing-chain", "--output", "json"))
    for args in runs:
        ours = cli(*args, path)
        theirs = qemu_img(*args, path)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs.stdout, args


def assert_converts_to_qcow2(path: Path, tmp: Path) -> None:
    """``convert -O qcow2`` (and ``flatten``) give images qemu-img finds equal to the
    source and clean."""
    for command in ("convert", "flatten"):
        out = tmp / f"{path.name}.{command}.qcow2"
        args = ("convert", "-O", "qcow2") if command == "convert" else ("flatten",)
        res = cli(*args, path, out)
        assert res.returncode == 0, res.stderr
        assert qemu_img("compare", path, out).returncode == 0
        assert qemu_img("check", out).returncode == 0


def assert_check_like_qemu(path: Path, tmp: Path, *, repair: str | None = None) -> None:
    """``check`` (human and JSON) prints, exits and repairs as ``qemu-img check``."""
    fix = ("-r", repair) if repair else ()
    for output in ("json", "human"):
        a = tmp / f"ours-{output}-{path.name}"
        b = tmp / f"qemu-{output}-{path.name}"
        shutil.copyfile(path, a)
        shutil.copyfile(path, b)
        ours = cli("check", *fix, "--output", output, a)
        theirs = qemu_img("check", *fix, f"--output={output}", b, check=False)
        assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
        assert ours.stderr == theirs.stderr
        if output == "json":
            got, want = json.loads(ours.stdout), json.loads(theirs.stdout)
            got["filename"] = want["filename"]
            assert list(got.items()) == list(want.items())
        else:
            assert ours.stdout == theirs.stdout
        assert a.read_bytes() == b.read_bytes(), "the repaired files differ"


def assert_refused(path: Path, *words: str) -> None:
    """qcowlib refuses the image with one error line naming the problem, no traceback,
    for ``info`` (or, when the header is fine, for a whole read)."""
    for args in (("info",), ("convert", "-O", "raw")):
        extra = (str(path) + ".out.raw",) if args[0] == "convert" else ()
        res = cli(*args, path, *extra)
        if res.returncode == 0:
            continue  # the header is fine: the read must fail
        assert res.returncode == 1
        assert "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qcowlib: error: "), res.stderr
        for w in words:
            assert w in lines[0], lines[0]
        return
    raise AssertionError(f"{path} was read without an error")
