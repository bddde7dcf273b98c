"""Command-line behaviour: entry points, usage errors, output spellings, no tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_img


def run(*args: str | Path, exe: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(exe or [sys.executable, "-m", "qcowlib"]), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_usage_errors_exit_2() -> None:
    for args in ([], ["nosuchcommand"], ["info"], ["info", "--output", "yaml", "x"]):
        res = run(*args)
        assert res.returncode == 2, args
        assert "Traceback" not in res.stderr


@pytest.mark.usefixtures("qemu")
def test_output_spellings_and_console_script(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    a = run("info", "--output", "json", img)
    b = run("info", "--output=json", img)
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout) == json.loads(b.stdout)
    script = Path(sys.executable).parent / "qcowlib"
    if script.exists() or shutil.which("qcowlib"):
        c = run("info", "--output=json", img, exe=[str(script if script.exists() else "qcowlib")])
        assert c.returncode == 0 and json.loads(c.stdout) == json.loads(a.stdout)


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 1024, b"QFI\xfb" + b"\xff" * 200, b"QFI\xfb\0\0\0\x03" + b"\0" * 100],
)
def test_garbage_never_tracebacks(content: bytes, tmp_path: Path) -> None:
    f = tmp_path / "junk.img"
    f.write_bytes(content)
    cases: list[list[str | Path]] = [
        ["info", f],
        ["map", f],
        ["convert", "-O", "raw", f, tmp_path / "o"],
    ]
    for args in cases:
        res = run(*args)
        assert res.returncode in (0, 1), res.stderr
        assert "Traceback" not in res.stderr
        if res.returncode:
            assert res.stderr.startswith("qcowlib: error: ")


def test_luks_refused_clearly(tmp_path: Path) -> None:
    f = tmp_path / "x.img"
    f.write_bytes(b"LUKS\xba\xbe\0\x01" + bytes(504 + 65536))
    res = run("map", f)
    assert res.returncode == 1
    assert "luks" in res.stderr and "not supported" in res.stderr


@pytest.mark.parametrize(
    ("magic", "what"),
    [
        (b"KDMV" + b"\0" * 508, "VMDK"),
        (b"vhdxfile" + b"\0" * 504, "VHDX"),
    ],
)
def test_broken_vmdk_vhdx_headers_rejected_clearly(magic: bytes, what: str, tmp_path: Path) -> None:
    f = tmp_path / "x.img"
    f.write_bytes(magic + bytes(65536))
    cases: list[list[str | Path]] = [
        ["info", f],
        ["map", f],
        ["convert", "-O", "raw", f, tmp_path / "o"],
    ]
    for args in cases:
        res = run(*args)
        assert res.returncode == 1, res.stdout
        assert res.stderr.startswith("qcowlib: error: ")
        assert what in res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_convert_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    f = tmp_path / "disk.raw"
    f.write_bytes(b"x" * 4096)
    res = run("convert", "-f", "raw", "-O", "raw", f, f)
    assert res.returncode == 1 and "same file" in res.stderr
    assert f.read_bytes() == b"x" * 4096


def test_convert_output_appears_only_when_complete(tmp_path: Path) -> None:
    f = tmp_path / "disk.raw"
    f.write_bytes(os.urandom(1 << 20))
    out = tmp_path / "out.raw"
    res = run("convert", "-p", "-O", "raw", f, out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == f.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if "qcowlib-tmp" in p.name] == []


def test_warnings_keep_the_cli_prefix_with_logging_loaded_late(tmp_path: Path) -> None:
    """Loggers import logging at their first use; the CLI's format still applies then."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from qcowlib import _log, cli\n"
            "from qcowlib._log import get_logger\n"
            "_log.configure_on_use(lambda: cli._configure_logging(False))\n"
            "assert 'logging' not in sys.modules\n"
            "get_logger('qcowlib.x').warning('careful %s', 1)\n"
            "get_logger('qcowlib.x').debug('hidden')\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr == "qcowlib: WARNING: careful 1\n"


@pytest.mark.parametrize(("command", "collects"), [("info", False), ("convert", True)])
def test_garbage_collector_is_off_for_metadata_commands_only(
    tmp_path: Path, command: str, collects: bool
) -> None:
    """Start-up runs without the cyclic collector (qcowlib.__main__); the metadata commands
    keep it off, every other command turns it back on once its command line is parsed."""
    src = tmp_path / "a.raw"
    src.write_bytes(bytes(4096))
    argv = (
        ["info", str(src)]
        if command == "info"
        else ["convert", "-f", "raw", "-O", "raw", str(src), str(tmp_path / "b.raw")]
    )
    code = (
        "import gc, sys; sys.argv = ['qcowlib', *sys.argv[1:]]\n"
        "from qcowlib.__main__ import run\n"
        "status = run()\n"
        "print(status, gc.isenabled(), file=sys.stderr)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
    )
    assert out.stderr.split()[-2:] == ["0", str(collects)]
