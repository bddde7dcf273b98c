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


_LEAVE = (
    "import sys\n"
    "class Witness:\n"
    "    def __del__(self):\n"
    "        sys.stderr.write('torn down\\n')\n"
    "witness = Witness()\n"
    "{extra}"
    "sys.argv = ['qcowlib', *sys.argv[1:]]\n"
    "from qcowlib.__main__ import program\n"
    "program()\n"
)


@pytest.mark.parametrize(
    ("extra", "torn_down"),
    [
        ("", False),
        ("import atexit; atexit.register(lambda: sys.stderr.write('atexit ran\\n'))\n", True),
        (
            "import threading, time\nthreading.Thread(target=time.sleep, args=(0.5,)).start()\n",
            True,
        ),
    ],
    ids=["quick", "atexit-callback", "thread-alive"],
)
def test_program_skips_interpreter_teardown_only_when_nothing_needs_it(
    tmp_path: Path, extra: str, torn_down: bool
) -> None:
    """The program ends without tearing the interpreter down (a fifth of `info`'s time)
    unless an atexit callback or another thread still needs the usual exit; either way
    all output arrives and the exit status is the command's."""
    src = tmp_path / "a.raw"
    src.write_bytes(bytes(65536))
    code = _LEAVE.format(extra=extra)
    ok = subprocess.run(
        [sys.executable, "-c", code, "map", "--output=json", str(src)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0
    assert json.loads(ok.stdout) == [
        {
            "start": 0,
            "length": 65536,
            "depth": 0,
            "present": True,
            "zero": False,
            "data": True,
            "offset": 0,
        }
    ]
    assert ("torn down" in ok.stderr) is torn_down
    assert ("atexit ran" in ok.stderr) is ("atexit" in extra)
    bad = subprocess.run(
        [sys.executable, "-c", code, "info", str(tmp_path / "missing")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("qcowlib: error: ")
    assert "Traceback" not in bad.stderr


def test_program_output_is_complete_through_a_pipe_and_a_full_disk(tmp_path: Path) -> None:
    """Leaving early flushes first: a large `map` arrives whole through a pipe; a stdout
    that cannot be written (/dev/full) fails with one line and status 1, no Python error."""
    src = tmp_path / "a.raw"
    with src.open("wb") as f:  # 2,000 separate data runs: a long listing
        for i in range(2000):
            f.seek(i * 8192)
            f.write(b"\1" * 512)
        f.truncate(2000 * 8192)
    usual = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv = ['qcowlib', *sys.argv[1:]]\n"
            "from qcowlib.__main__ import run\nsys.exit(run())",
            "map",
            "--output=json",
            "-f",
            "raw",
            str(src),
        ],
        check=False,
        capture_output=True,
        timeout=60,
    )
    quick = run_bytes("map", "--output=json", "-f", "raw", src)
    assert usual.returncode == quick.returncode == 0
    assert quick.stdout == usual.stdout and len(quick.stdout) > 100_000
    if os.path.exists("/dev/full"):
        with open("/dev/full", "wb") as full:
            res = subprocess.run(
                [sys.executable, "-m", "qcowlib", "info", str(src)],
                check=False,
                env=_buffered_env(),
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        assert res.returncode == 1
        assert res.stderr.startswith("qcowlib: error: ")
        assert res.stderr.endswith("No space left on device\n")
        assert res.stderr.count("\n") == 1


def _buffered_env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED: stdout to a file or pipe is then block
    buffered, so output is still in the buffer when the command returns."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    ("broken", "command", "status"),
    [("full", "info", 1), ("pipe", "info", 1), ("full", "compare", 2), ("pipe", "compare", 2)],
)
def test_output_lost_at_the_last_flush_is_one_line_and_the_error_status(
    tmp_path: Path, broken: str, command: str, status: int
) -> None:
    """Output still buffered when the command returns is flushed by the program before
    it leaves: a full disk is one error line, a reader that went away is no word, and
    either is the command's error status (2 for compare, whose 1 means "different");
    never a Python error."""
    src = tmp_path / "a.raw"
    src.write_bytes(bytes(4096))
    args = ["info", str(src)] if command == "info" else ["compare", str(src), str(src)]
    if broken == "full":
        with open("/dev/full", "wb") as full:
            res = subprocess.run(
                [sys.executable, "-m", "qcowlib", *args],
                check=False,
                env=_buffered_env(),
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        assert res.stderr == "qcowlib: error: cannot write the output: No space left on device\n"
    else:
        code = (
            "import os, sys\n"
            "r, w = os.pipe(); os.close(r)\n"
            "sys.stdout = open(w, 'w')\n"
            "sys.argv = ['qcowlib', *sys.argv[1:]]\n"
            "from qcowlib.__main__ import program\n"
            "program()\n"
        )
        res = subprocess.run(
            [sys.executable, "-c", code, *args],
            check=False,
            env=_buffered_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.stderr == ""
    assert res.returncode == status


def test_a_program_running_qcowlib_inside_itself_goes_on(tmp_path: Path) -> None:
    """Run by another program (``runpy``, or ``main()``), qcowlib exits with SystemExit
    as usual: the host catches it, its own buffered files keep their data, its code goes
    on.  Only qcowlib's own process (``python -m qcowlib``, the console script) ends early."""
    src = tmp_path / "a.raw"
    src.write_bytes(bytes(4096))
    log = tmp_path / "host.log"
    code = (
        "import runpy, sys\n"
        "log = open(sys.argv[1], 'w')\n"
        "log.write('before\\n')\n"
        "for how in ('runpy', 'main'):\n"
        "    sys.argv = ['qcowlib', 'info', sys.argv[2]] if how == 'runpy' else sys.argv\n"
        "    try:\n"
        "        if how == 'runpy':\n"
        "            runpy.run_module('qcowlib', run_name='__main__')\n"
        "        else:\n"
        "            from qcowlib.__main__ import main\n"
        "            main()\n"
        "    except SystemExit as exc:\n"
        "        log.write(f'{how} exit {exc.code}\\n')\n"
        "print('HOST DONE')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(log), str(src)],
        check=False,
        env=_buffered_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("HOST DONE\n")
    assert log.read_text() == "before\nrunpy exit 0\nmain exit 0\n"


def run_bytes(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "qcowlib", *map(str, args)],
        check=False,
        capture_output=True,
        timeout=60,
    )
