"""``qcowlib.core.layerruns`` against plain Python models: runs of bits in many bitmaps
at once, and runs cut at a sparse file's holes (one walk per stretch of the file)
equal to each run's own ``HostFile.segments`` walk."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.core.hostfile import HostFile
from qcowlib.core.layerruns import bit_runs, split_by_holes


def _model_bit_runs(
    rows: list[bytes], nbits: int, order: Literal["big", "little"]
) -> list[tuple[int, int, int, bool]]:
    out = []
    for r, row in enumerate(rows):
        bits = [
            bool(row[i // 8] >> (7 - i % 8 if order == "big" else i % 8) & 1) for i in range(nbits)
        ]
        i = 0
        while i < nbits:
            j = i
            while j < nbits and bits[j] == bits[i]:
                j += 1
            out.append((r, i, j - i, bits[i]))
            i = j
    return out


@settings(max_examples=200, deadline=None)
@given(
    nbytes=st.integers(1, 6),
    data=st.data(),
    order=st.sampled_from(["big", "little"]),
)
def test_bit_runs_equal_a_row_by_row_model(
    nbytes: int, data: st.DataObject, order: Literal["big", "little"]
) -> None:
    byte = st.one_of(st.sampled_from([0, 0xFF]), st.integers(0, 255))
    rows = data.draw(st.lists(st.lists(byte, min_size=nbytes, max_size=nbytes), max_size=8))
    nbits = data.draw(st.integers(1, nbytes * 8))
    raw = [bytes(r) for r in rows]
    arr = np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), nbytes)
    row, first, count, is_set = bit_runs(arr, nbits, order)
    got = list(zip(row.tolist(), first.tolist(), count.tolist(), is_set.tolist(), strict=True))
    assert got == _model_bit_runs(raw, nbits, order)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    blocks=st.lists(st.booleans(), min_size=1, max_size=24),
    runs=st.lists(st.tuples(st.integers(0, 30 * 4096), st.integers(0, 5 * 4096)), max_size=10),
)
def test_split_by_holes_equals_each_runs_own_walk(
    tmp_path: Path, blocks: list[bool], runs: list[tuple[int, int]]
) -> None:
    path = tmp_path / "sparse"
    with path.open("wb") as f:  # 4 KiB blocks: data or hole; runs may reach past the end
        f.truncate(len(blocks) * 4096)
        for i, is_data in enumerate(blocks):
            if is_data:
                f.seek(i * 4096)
                f.write(b"\x01" * 4096)
    host = HostFile(str(path))
    try:
        at = np.array([a for a, _ in runs], dtype=np.int64)
        length = np.array([n for _, n in runs], dtype=np.int64)
        start = at * 3 + 7  # guest offsets: anything, shifted with the host offsets
        run, p_start, p_len, p_at, p_data = split_by_holes(host, start, length, at)
        got = list(
            zip(
                run.tolist(), p_start.tolist(), p_len.tolist(), p_at.tolist(), p_data.tolist(),
                strict=True,
            )
        )  # fmt: skip
        want = [
            (i, int(start[i]) + s - a, e - s, s, d)
            for i, (a, n) in enumerate(runs)
            for s, e, d in host.segments(a, a + n)
        ]
        assert got == want
    finally:
        host.close()
