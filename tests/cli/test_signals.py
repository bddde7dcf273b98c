"""SIGINT, SIGTERM and SIGHUP during writing commands (contract: "Backing files, locks,
outputs" and "Exit status").

Each writer is signalled mid-way (once its temporary output exists, or once its progress
shows it copying) and must exit 128 + N with one ``qcowlib: error:`` line, no traceback
and no file left behind; in-place writers (commit, rebase) must leave images that
``qemu-img check`` finds clean and whose guest content ``qemu-img compare`` finds
unchanged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import qemu_img, require_qemu

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
MiB = 1 << 20


@pytest.fixture(scope="module")
def big_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of non-zero data (a 1 MiB random block repeated): long enough to copy
    that a signal lands mid-way."""
    path = tmp_path_factory.mktemp("signals") / "big.raw"
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(256):
            f.write(block)
    return path


class Running:
    """A ``python -m qcowlib`` process whose stderr is collected as it comes."""

    def __init__(self, *args: str | Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qcowlib", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.err = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 4096):
            self.err += chunk

    def signal_when(self, ready: Callable[[], bool], sig: int, timeout: float = 60) -> bool:
        """Send ``sig`` as soon as ``ready()``; returns whether it was ready in time
        (False also when the process ended first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if ready():
                self.proc.send_signal(sig)
                return True
            time.sleep(0.002)
        return False

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc, self.err.decode(errors="replace")


def temp_outputs(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".qcowlib-tmp")]


def check_interrupted(rc: int, err: str, sig: int) -> None:
    assert rc == 128 + sig, err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("qcowlib")]
    assert lines == [f"qcowlib: error: interrupted by {signal.Signals(sig).name}"], err


CONVERT_QCOW2 = (["convert", "-f", "raw", "-O", "qcow2"], "out.qcow2")


@pytest.mark.parametrize(
    ("command", "out_name", "sig"),
    [
        *((*CONVERT_QCOW2, sig) for sig in SIGNALS),
        (["convert", "-f", "raw", "-O", "vmdk"], "out.vmdk", signal.SIGTERM),
        (["convert", "-f", "raw", "-O", "raw", "-S", "0"], "out.raw", signal.SIGHUP),
        (["convert", "-c", "-f", "raw", "-O", "qcow2"], "out.qcow2", signal.SIGTERM),
        (["flatten", "-f", "raw", "-O", "qcow2"], "flat.qcow2", signal.SIGTERM),
        (["flatten", "-f", "raw", "-O", "vdi"], "flat.vdi", signal.SIGINT),
    ],
    ids=[
        *(f"convert-qcow2-{signal.Signals(s).name}" for s in SIGNALS),
        "convert-vmdk-SIGTERM", "convert-raw-SIGHUP", "convert-compressed-SIGTERM",
        "flatten-qcow2-SIGTERM", "flatten-vdi-SIGINT",
    ],
)  # fmt: skip
def test_new_image_writers_remove_their_temporary_output(
    big_raw: Path, tmp_path: Path, command: list[str], out_name: str, sig: int
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = Running(*command, big_raw, out_dir / out_name)
    assert run.signal_when(lambda: bool(temp_outputs(out_dir)), sig), "no temporary output"
    rc, err = run.finish()
    check_interrupted(rc, err, sig)
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_create_removes_its_temporary_output(tmp_path: Path, sig: int) -> None:
    """A fully preallocated raw image is written zero by zero: long enough to stop."""
    run = Running("create", "-f", "raw", "-o", "preallocation=full", tmp_path / "new.raw", "2G")
    assert run.signal_when(lambda: bool(temp_outputs(tmp_path)), sig), "no temporary output"
    rc, err = run.finish()
    check_interrupted(rc, err, sig)
    assert os.listdir(tmp_path) == []


def test_an_existing_output_survives_an_interrupted_overwrite(
    big_raw: Path, tmp_path: Path
) -> None:
    """The old file stays as it was: the new one would only have replaced it whole."""
    out = tmp_path / "keep.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", out, "1M")
    before = out.read_bytes()
    run = Running("convert", "-f", "raw", "-O", "qcow2", big_raw, out)
    assert run.signal_when(lambda: bool(temp_outputs(tmp_path)), signal.SIGTERM)
    rc, err = run.finish()
    check_interrupted(rc, err, signal.SIGTERM)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["keep.qcow2"]


def _copying(run: Running) -> Callable[[], bool]:
    """Ready once ``-p`` progress shows the copy started and not finished."""

    def ready() -> bool:
        shown = run.err.decode(errors="replace").replace("\r", "\n").split("(")
        for part in shown[1:]:
            pct = part.split("/", 1)[0]
            try:
                if 1.0 <= float(pct) < 90.0:
                    return True
            except ValueError:
                continue
        return False

    return ready


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_commit_stops_with_both_images_consistent(big_raw: Path, tmp_path: Path, sig: int) -> None:
    """Interrupted commit: part of the data is in the base, all of it still in the top
    (so the guest sees the same disk), and both images check clean."""
    require_qemu()
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "256M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", big_raw, top)
    run = Running("commit", "-p", top)
    assert run.signal_when(_copying(run), sig), "the commit never showed progress"
    rc, err = run.finish()
    check_interrupted(rc, err, sig)
    for image in (base, top):
        assert qemu_img("check", "-q", image, check=False).returncode == 0, image
    assert qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", big_raw, top).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["base.qcow2", "top.qcow2"]


@pytest.mark.parametrize("sig", [signal.SIGHUP], ids=["SIGHUP"])
def test_rebase_stops_with_the_image_consistent(big_raw: Path, tmp_path: Path, sig: int) -> None:
    """Interrupted safe rebase (``-b ""``, copying the backing file's data in): the image
    keeps its old backing file, checks clean and shows the same disk."""
    require_qemu()
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", big_raw, base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    run = Running("rebase", "-p", "-b", "", top)
    assert run.signal_when(_copying(run), sig), "the rebase never showed progress"
    rc, err = run.finish()
    check_interrupted(rc, err, sig)
    assert qemu_img("check", "-q", top, check=False).returncode == 0
    assert qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", big_raw, top).returncode == 0
    info = qemu_img("info", top).stdout
    assert "backing file: base.qcow2" in info


def test_no_traceback_from_a_signal_during_start_up(tmp_path: Path) -> None:
    """Ctrl-C at any moment of start-up: once qcowlib's own code runs, the command ends
    with status 130 and one line, never a traceback (before that, only CPython's own
    start-up runs; its tracebacks name no qcowlib file, and are not ours to change)."""
    require_qemu()
    image = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    statuses = []
    for i in range(24):
        proc = subprocess.Popen(
            [sys.executable, "-m", "qcowlib", "info", str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(i * 0.004)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        statuses.append(proc.returncode)
        if "Traceback" in err:
            assert "qcowlib" not in err, err
        elif proc.returncode == 130:
            assert err == "qcowlib: error: interrupted by SIGINT\n", err
    assert 130 in statuses  # the signal did land in qcowlib's code at least once


def test_nohup_keeps_sighup_ignored(big_raw: Path, tmp_path: Path) -> None:
    """A signal the parent ignores stays ignored (``nohup qcowlib convert ...``)."""
    out = tmp_path / "out.qcow2"
    nohup = shutil.which("nohup")
    if nohup is None:
        pytest.skip("no nohup")
    proc = subprocess.Popen(
        [nohup, sys.executable, "-m", "qcowlib", "convert", "-f", "raw", "-O", "qcow2",
         str(big_raw), str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not temp_outputs(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", big_raw, out).returncode == 0


def test_a_signal_landing_in_library_clean_up_still_exits_as_the_signal() -> None:
    """``RuntimeError: release unlocked lock`` raised while a signal's exception unwinds
    through ``Condition.wait`` is reported as that signal, not as an internal error."""
    from qcowlib.core import interrupt

    try:
        try:
            raise interrupt.Interrupted(signal.SIGHUP)
        except KeyboardInterrupt:
            raise RuntimeError("release unlocked lock") from None
    except RuntimeError as exc:
        found = interrupt.cause(exc)
    assert found is None  # "from None" hides the context: nothing to find
    try:
        try:
            raise interrupt.Interrupted(signal.SIGHUP)
        except KeyboardInterrupt:
            raise RuntimeError("release unlocked lock")  # noqa: B904 - as the library does
    except RuntimeError as exc:
        found = interrupt.cause(exc)
    assert found is not None and interrupt.exit_status(found) == 129


def test_a_signal_landing_in_a_weakref_callback_is_delivered_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A signal whose exception is raised inside a weak-reference callback (the garbage
    collector or a thread pool's clean-up running when it lands) was printed as
    "Exception ignored in ..." with a traceback, and `flatten` then finished with status
    0 as if never signalled; the signal is raised again in the main flow."""
    import weakref

    from qcowlib.core import interrupt

    handlers = {sig: signal.getsignal(sig) for sig in interrupt.HANDLED}
    hook = sys.unraisablehook
    saved = vars(interrupt._state).copy()

    class Thing:
        pass

    try:
        interrupt.install()
        thing = Thing()
        ref = weakref.ref(thing, lambda _: interrupt._handler(signal.SIGTERM, None))
        with pytest.raises(interrupt.Interrupted) as caught:
            del thing  # the callback runs here; its exception cannot propagate
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.001)
        assert ref() is None
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        sys.unraisablehook = hook
        vars(interrupt._state).update(saved)
    assert caught.value.signum == signal.SIGTERM
    assert "Exception ignored" not in capsys.readouterr().err
