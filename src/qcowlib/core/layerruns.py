"""Array helpers for readers that build a layer's :class:`~qcowlib.core.disk.Runs`
(``Disk.layer_runs``) a table at a time, with no Python step per entry or per run.

- :func:`layer_runs` wraps a layer's run arrays as :class:`Runs` (depth 0).
- :func:`bit_runs` turns many sector bitmaps (rows of a 2-D array) into runs of equal
  bits at once (VHD and VHDX sector bitmaps).
- :func:`split_by_holes` cuts runs stored in a host file at the file's holes
  (``SEEK_DATA``/``SEEK_HOLE``), walking each stretch of the file the runs cover once,
  as ``qemu-img map`` shows holes under data of some formats.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import Runs
from qcowlib.core.hostfile import HostFile

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
B = npt.NDArray[np.bool_]

__all__ = ["bit_runs", "empty_runs", "layer_runs", "split_by_holes"]

#: Bitmap bits unpacked at once at most (one byte each): bounds memory on any window.
MAX_UNPACKED_BITS = 1 << 24


def layer_runs(
    start: I64,
    length: I64,
    kind: U8,
    host: I64,
    file: I64,
    files: tuple[str | None, ...],
    hole: B | None = None,
    clen: I64 | None = None,
) -> Runs:
    """A layer's runs (depth 0) from its arrays; ``hole`` and ``clen`` default to none."""
    n = int(start.size)
    return Runs(
        start.astype(np.int64, copy=False),
        length.astype(np.int64, copy=False),
        kind.astype(np.uint8, copy=False),
        host.astype(np.int64, copy=False),
        np.zeros(n, dtype=np.int64) if clen is None else clen.astype(np.int64, copy=False),
        np.zeros(n, dtype=np.bool_) if hole is None else hole.astype(np.bool_, copy=False),
        np.zeros(n, dtype=np.int64),
        file.astype(np.int64, copy=False),
        files,
    )


def empty_runs(files: tuple[str | None, ...] = (None,)) -> Runs:
    """No runs (an empty range)."""
    e = np.zeros(0, dtype=np.int64)
    return layer_runs(e, e, np.zeros(0, dtype=np.uint8), e, e, files)


def bit_runs(rows: U8, nbits: int, bitorder: Literal["big", "little"]) -> tuple[I64, I64, I64, B]:
    """Runs of equal bits in the first ``nbits`` bits of each row of ``rows`` (a 2-D
    ``uint8`` array, one bitmap a row; ``bitorder`` as :func:`numpy.unpackbits`).

    Returns ``(row, first, count, is_set)`` sorted by row, then bit: every row's bits
    are covered with no gaps, and two neighbours in one row differ.  Rows whose bits are
    all equal cost no unpacking.
    """
    m = int(rows.shape[0])
    if m == 0 or nbits <= 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e, np.zeros(0, dtype=np.bool_)
    whole, rem = divmod(nbits, 8)
    if int(rows.shape[1]) * 8 < nbits:
        raise ValueError(f"bitmaps of {rows.shape[1]} bytes cannot hold {nbits} bits")
    body = rows[:, :whole]
    ones = (body == 0xFF).all(axis=1)
    zeros = (body == 0).all(axis=1)
    if rem:
        mask = (0xFF << (8 - rem)) & 0xFF if bitorder == "big" else (1 << rem) - 1
        last = rows[:, whole] & mask
        ones &= last == mask
        zeros &= last == 0
    uniform = np.flatnonzero(ones | zeros)
    parts = [
        (uniform, np.zeros(uniform.size, np.int64), np.full(uniform.size, nbits), ones[uniform])
    ]
    mixed = np.flatnonzero(~(ones | zeros))
    step = max(1, MAX_UNPACKED_BITS // nbits)
    for at in range(0, mixed.size, step):
        chunk = mixed[at : at + step]
        bits = np.unpackbits(rows[chunk], axis=1, count=nbits, bitorder=bitorder).astype(np.bool_)
        heads = np.ones(bits.shape, dtype=np.bool_)
        heads[:, 1:] = bits[:, 1:] != bits[:, :-1]
        flat = np.flatnonzero(heads)
        count = np.diff(np.append(flat, bits.size))
        parts.append((chunk[flat // nbits], flat % nbits, count, bits.ravel()[flat]))
    row = np.concatenate([p[0] for p in parts]).astype(np.int64)
    first = np.concatenate([p[1] for p in parts]).astype(np.int64)
    order = np.argsort(row * nbits + first, kind="stable")
    count = np.concatenate([p[2] for p in parts]).astype(np.int64)
    is_set = np.concatenate([p[3] for p in parts]).astype(np.bool_)
    return row[order], first[order], count[order], is_set[order]


def _merged(lo: I64, hi: I64) -> tuple[I64, I64]:
    """Sorted ``[lo, hi)`` ranges with overlapping or touching ones merged."""
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi)
    heads = np.flatnonzero(np.concatenate(([True], lo[1:] > reach[:-1])))
    tails = np.append(heads[1:], lo.size) - 1
    return lo[heads], reach[tails]


def split_by_holes(
    host: HostFile, start: I64, length: I64, at: I64
) -> tuple[I64, I64, I64, I64, B]:
    """Runs of guest ``[start, start + length)`` stored at ``at`` in ``host``, cut where
    the file's data and holes change (:meth:`HostFile.segments`; past the end of the
    file is a hole).

    Returns ``(run, start, length, at, is_data)`` of the pieces, in the runs' order
    (``run`` indexes the input).  Each stretch of the file the runs cover is walked once
    (the system calls are per data/hole change, as each run's own walk would make).
    """
    keep = np.flatnonzero(length > 0)
    if not keep.size:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e, e, np.zeros(0, dtype=np.bool_)
    lo, hi = _merged(at[keep], at[keep] + length[keep])
    seg: list[tuple[int, int, bool]] = []
    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        seg.extend(host.segments(a, b))
    s_lo = np.array([s[0] for s in seg], dtype=np.int64)
    s_hi = np.array([s[1] for s in seg], dtype=np.int64)
    s_data = np.array([s[2] for s in seg], dtype=np.bool_)
    h0, h1 = at[keep], at[keep] + length[keep]
    first = np.searchsorted(s_hi, h0, side="right")
    counts = np.searchsorted(s_lo, h1, side="left") - first
    run = np.repeat(keep, counts)
    which = np.repeat(np.arange(keep.size), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    idx = np.repeat(first, counts) + within
    p_lo = np.maximum(s_lo[idx], h0[which])
    p_hi = np.minimum(s_hi[idx], h1[which])
    return run, start[run] + (p_lo - at[run]), p_hi - p_lo, p_lo, s_data[idx]
