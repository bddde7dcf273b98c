"""atomic_output: complete files appear at their name, failed ones never; writeback."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from qcowlib.disk._file import pwrite_all
from qcowlib.engine import output
from qcowlib.errors import InvalidArgument


def _writeback_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "qcowlib-writeback"]


def test_output_appears_complete_and_writeback_thread_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kicks: list[int] = []
    monkeypatch.setattr(output, "WRITEBACK_INTERVAL", 0.01)
    real = output._sync_file_range()
    assert real is not None  # Linux: the kick is available

    def counting() -> object:
        def kick(fd: int) -> None:
            kicks.append(fd)
            real(fd)

        return kick

    monkeypatch.setattr(output, "_sync_file_range", counting)
    dst = tmp_path / "out.img"
    data = os.urandom(1 << 20)
    with output.atomic_output(str(dst)) as fd:
        for i in range(8):
            pwrite_all(fd, data, i << 20)
            threading.Event().wait(0.02)
        assert not dst.exists()
        assert _writeback_threads()
    assert dst.read_bytes() == data * 8
    assert kicks and not _writeback_threads()


def test_failed_output_leaves_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "out.img"
    with pytest.raises(RuntimeError), output.atomic_output(str(dst)) as fd:
        pwrite_all(fd, b"x" * 4096, 0)
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == [] and not _writeback_threads()


def test_output_may_not_replace_an_input(tmp_path: Path) -> None:
    src = tmp_path / "in.img"
    src.write_bytes(b"y" * 512)
    with pytest.raises(InvalidArgument), output.atomic_output(str(src), protect=(str(src),)):
        pass
    assert src.read_bytes() == b"y" * 512


def test_directory_is_synced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is made durable too: the directory is fsynced once the name exists."""
    dst = tmp_path / "out.img"
    synced: list[bool] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(dst.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    with output.atomic_output(str(dst)) as fd:
        pwrite_all(fd, b"x" * 4096, 0)
    assert synced == [True]
