"""write_raw: bytes equal, zero blocks left as holes (also inside reserved ranges)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qcowlib.core import hostfile as _file
from qcowlib.core.copy import write_raw
from qcowlib.formats.opener import open_disk

M = 1 << 20


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
    out = tmp_path / "out.raw"
    with open_disk(str(src), "raw") as disk:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_raw(disk, fd, sparse_size=sparse_size)
        finally:
            os.close(fd)
    assert out.read_bytes() == src.read_bytes()
    allocated = os.stat(out).st_blocks * 512
    if sparse_size:
        assert allocated <= 2 * M + 64 * 1024  # the zeros were not written (or punched)
