"""atomic_output: complete files appear at their name, failed ones never; writeback."""

from __future__ import annotations

import os
import random
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qcowlib.core import hostfile as _file
from qcowlib.core import sinks as output
from qcowlib.core.hostfile import pwrite_all
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


@given(st.lists(st.integers(0, 3 * _file.WRITE_MAX // 2), min_size=1, max_size=12))
@settings(max_examples=40, deadline=None)
def test_writes_are_whole_and_at_most_write_max_a_call(sizes: list[int]) -> None:
    """pwritev_all and pwrite_all write every byte in order, in calls of at most
    WRITE_MAX bytes (larger writes get 2 MiB page-cache folios, slow on this VM)."""
    assume(sum(sizes) > 0)
    rng = random.Random(len(sizes))
    parts: list[bytes | memoryview] = [rng.randbytes(n) for n in sizes]
    parts[0] = memoryview(parts[0])
    calls: list[int] = []
    real_pwritev, real_pwrite = os.pwritev, os.pwrite

    def pwritev(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls.append(sum(len(b) for b in bufs))
        return real_pwritev(fd, bufs, offset)

    def pwrite(fd: int, buf: memoryview, offset: int) -> int:
        calls.append(len(buf))
        return real_pwrite(fd, buf, offset)

    with tempfile.TemporaryFile() as f, pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "pwritev", pwritev)
        mp.setattr(os, "pwrite", pwrite)
        _file.pwritev_all(f.fileno(), parts, 7)
        _file.pwrite_all(f.fileno(), b"".join(bytes(p) for p in parts), 7 + sum(sizes))
        f.seek(0)
        data = f.read()
    expected = b"".join(bytes(p) for p in parts)
    assert data == bytes(7) + expected + expected
    assert calls and max(calls) <= _file.WRITE_MAX
