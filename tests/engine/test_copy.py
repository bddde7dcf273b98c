"""write_raw: bytes equal, zero blocks left as holes (also inside reserved ranges)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qcowlib.core import hostfile as _file
from qcowlib.core.copy import write_raw
from qcowlib.formats.opener import open_disk

M = 1 << 20


def _write_raw(src: Path, out: Path, sparse_size: int) -> Path:
    """``write_raw`` of raw file ``src`` into a new file ``out``."""
    with open_disk(str(src), "raw") as disk:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_raw(disk, fd, sparse_size=sparse_size)
        finally:
            os.close(fd)
    return out


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("sparse_size", [4096, 0])
def test_raw_output_is_sparse_where_data_is_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, sparse_size: int
) -> None:
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.write(b"\x01" * M)  # data
        f.write(bytes(6 * M))  # allocated zeros (data to the file system)
        f.write(b"\x02" * (M + 512))  # data, ending off a page
        f.truncate(16 * M + 4096 + 512)  # a hole, and an odd size
    if not direct:
        monkeypatch.setattr(_file, "_open_direct", lambda fd: -1)
    out = _write_raw(src, tmp_path / "out.raw", sparse_size)
    assert out.read_bytes() == src.read_bytes()
    allocated = os.stat(out).st_blocks * 512
    if sparse_size:
        assert allocated <= 2 * M + 64 * 1024  # the zeros were not written (or punched)


@pytest.mark.parametrize("sparse_size", [4096, 512, 0])
def test_fragmented_source_shares_jobs_and_copies_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse_size: int
) -> None:
    """Thousands of small scattered data blocks (the shape of an overlay after real use)
    are packed many to a job, past the reserve limit, and come out byte for byte."""
    import random

    from qcowlib.core import copy as copy_mod

    rng = random.Random(3)
    src = tmp_path / "frag.raw"
    size = 64 * M
    blocks = sorted(rng.sample(range(size // 4096), 3000))
    with src.open("wb") as f:
        f.truncate(size)
        for b in blocks:  # 1 or 2 pages, some with a zero page, some touching
            f.seek(b * 4096)
            f.write(rng.randbytes(4096) + (bytes(4096) if b % 3 == 0 else b""))
    monkeypatch.setattr(copy_mod, "RESERVE_MAX_RANGES", 10)
    reserved: list[object] = []

    def reserve(*args: object) -> bool:
        reserved.append(args)
        return True

    monkeypatch.setattr(copy_mod, "_reserve", reserve)
    from qcowlib.core.pipeline import ordered_map

    jobs: list[int] = []

    def counting_map(items: object, work: object, **kw: object) -> object:
        def counted(job: copy_mod._Job) -> object:
            jobs.append(len(job.segments))
            assert all(seg.at % 4096 == 0 for seg in job.segments)  # O_DIRECT-able
            return work(job)  # type: ignore[operator]

        return ordered_map(items, counted, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(copy_mod, "ordered_map", counting_map)
    out = _write_raw(src, tmp_path / "out.raw", sparse_size)
    assert out.read_bytes() == src.read_bytes()
    assert sum(jobs) > 2000 and len(jobs) < sum(jobs) // 100  # many segments a job
    assert reserved == []  # thousands of ranges: no fallocate call for each
