"""AppendWriter: appended bytes land where they belong, through either write path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.core import hostfile as _file
from qcowlib.core.appendsink import STAGE, AppendWriter
from qcowlib.core.pipeline import TaskQueue

steps = st.lists(st.tuples(st.booleans(), st.integers(1, 3 * STAGE // 2)), min_size=1, max_size=12)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(start=st.integers(0, 3 * 4096), plan=steps, direct=st.booleans())
def test_appends_and_skips_land_in_place(
    tmp_path: Path, start: int, plan: list[tuple[bool, int]], direct: bool
) -> None:
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    model = bytearray(start)
    sink = _file.DataWriter(fd, direct=direct)
    try:
        with TaskQueue(2, 2) as tasks:
            out = AppendWriter(sink, tasks, start, buffers=3)
            for i, (skip, n) in enumerate(plan):
                if skip:
                    out.skip_to(out.pos + n)
                    model += bytes(n)
                else:
                    data = bytes([i % 251 + 1]) * n
                    out.append(data)
                    model += data
            end = out.close()
        os.ftruncate(fd, end)
    finally:
        sink.close()
        os.close(fd)
    assert end == len(model)
    assert path.read_bytes() == bytes(model)


def test_direct_writes_fall_back_where_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses O_DIRECT (EINVAL) gets the same bytes through the
    page cache, and no further direct attempts."""
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = _file.DataWriter(fd)
    real = os.pwritev
    refused: list[int] = []

    def refuse_direct(f: int, batch: list[memoryview], offset: int) -> int:
        if f == sink.direct_fd:
            refused.append(offset)
            raise OSError(22, "Invalid argument")
        return real(f, batch, offset)

    try:
        if sink.direct_fd < 0:
            pytest.skip("no O_DIRECT here")
        buf = _file.aligned_buffer(1 << 20)
        buf[:] = b"\x5a" * (1 << 20)
        monkeypatch.setattr(os, "pwritev", refuse_direct)
        sink.write(0, [buf])
        sink.write(1 << 20, [buf])
    finally:
        sink.close()
        os.close(fd)
    assert refused == [0]
    assert not sink.use_direct
    assert path.read_bytes() == b"\x5a" * (2 << 20)
