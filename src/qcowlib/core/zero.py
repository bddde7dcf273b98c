"""Vectorised zero detection over buffers."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def nonzero_blocks(buf: memoryview | bytes | bytearray, block: int) -> npt.NDArray[np.bool_]:
    """One flag per ``block`` bytes of ``buf``: True where the block holds a non-zero byte.

    The last block may be partial.  ``block`` must be a positive multiple of 8.
    """
    n = len(buf)
    full = n // block
    flags = np.empty(full + (1 if n % block else 0), dtype=np.bool_)
    if full:
        words = np.frombuffer(buf, dtype=np.uint64, count=full * block // 8)
        flags[:full] = words.reshape(full, block // 8).any(axis=1)
    if n % block:
        tail = np.frombuffer(buf, dtype=np.uint8, offset=full * block)
        flags[full] = bool(tail.any())
    return flags


def nonzero_runs(buf: memoryview | bytes | bytearray, block: int) -> list[tuple[int, int]]:
    """``(start, end)`` byte ranges of ``buf`` that are not all zeros, in ``block`` steps."""
    flags = nonzero_blocks(buf, block)
    if not flags.any():
        return []
    if flags.all():
        return [(0, len(buf))]
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flags, [False])).astype(np.int8)))
    starts = edges[0::2] * block
    ends = np.minimum(edges[1::2] * block, len(buf))
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def is_zero(buf: memoryview | bytes | bytearray) -> bool:
    """Whether every byte of ``buf`` is zero."""
    n = len(buf)
    words = n // 8
    if words and np.frombuffer(buf, dtype=np.uint64, count=words).any():
        return False
    return not np.frombuffer(buf, dtype=np.uint8, offset=words * 8).any()
