"""``compare``: whether two disks have the same guest-visible content (qemu-img compare)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from qcowlib.core.disk import Disk, Extent, ExtentKind
from qcowlib.core.hostfile import aligned_buffer

Progress = Callable[[int, int], None]

_CHUNK = 4 * 1024 * 1024
#: qemu-img reports the first differing 512-byte sector.
_SECTOR = 512


@dataclass
class CompareResult:
    """The verdict and the lines qemu-img compare prints for it."""

    identical: bool
    messages: list[str] = field(default_factory=list)
    mismatch_offset: int | None = None


def _pieces(a: Disk, b: Disk, end: int) -> Iterator[tuple[Extent, Extent, int, int]]:
    """Overlapping resolved extents of ``a`` and ``b`` and the range they share."""
    ia, ib = a.extents(0, end), b.extents(0, end)
    ea, eb = next(ia, None), next(ib, None)
    pos = 0
    while ea is not None and eb is not None and pos < end:
        stop = min(ea.end, eb.end)
        yield ea, eb, pos, stop
        pos = stop
        if ea.end == stop:
            ea = next(ia, None)
        if eb.end == stop:
            eb = next(ib, None)


# Block status flags as QEMU's bdrv_block_status_above() reports them; strict mode
# compares these, so an equal-content zero cluster and a data cluster differ.
_DATA, _ZERO, _OFFSET_VALID, _ALLOCATED, _EOF = 1, 2, 4, 16, 32


def _status(disk: Disk, ext: Extent) -> int:
    """QEMU's status flags for a resolved extent of ``disk``."""
    kind = ext.kind
    if kind is ExtentKind.DATA:
        flags = _DATA | _OFFSET_VALID | _ALLOCATED | (_ZERO if ext.hole else 0)
    elif kind is ExtentKind.COMPRESSED:
        flags = _DATA | _ALLOCATED
    elif kind is ExtentKind.ZERO:
        flags = _ZERO | _ALLOCATED | (_OFFSET_VALID if ext.host_offset is not None else 0)
    elif disk.chain[ext.depth].backing is not None:
        # Past the end of a shorter backing file: zeros "allocated" at that layer.
        flags = _ZERO | _ALLOCATED
    else:
        flags = _ZERO | (_OFFSET_VALID if ext.host_offset is not None else 0)
    if ext.end == disk.virtual_size:
        flags |= _EOF
    return flags


def _differs(va: memoryview, vb: memoryview) -> bool:
    """Whether two equally long buffers differ (compared as 64-bit words, vectorised;
    comparing memoryviews with ``!=`` goes element by element in Python)."""
    words = len(va) // 8
    if not np.array_equal(
        np.frombuffer(va, dtype=np.uint64, count=words),
        np.frombuffer(vb, dtype=np.uint64, count=words),
    ):
        return True
    return bytes(va[words * 8 :]) != bytes(vb[words * 8 :])


def _first_nonzero(disk: Disk, start: int, end: int) -> int | None:
    buf = aligned_buffer(_CHUNK)
    for ext in disk.extents(start, end - start):
        if ext.reads_zero:
            continue
        pos = ext.start
        while pos < ext.end:
            n = min(_CHUNK, ext.end - pos)
            view = buf[:n]
            disk.read_extent(ext.clip(pos, pos + n), view)
            nz = np.flatnonzero(np.frombuffer(view, dtype=np.uint8))
            if nz.size:
                return pos + int(nz[0])
            pos += n
    return None


def compare(
    a: Disk, b: Disk, *, strict: bool = False, progress: Progress | None = None
) -> CompareResult:
    """Compare guest content as ``qemu-img compare`` does (``strict`` is ``-s``);
    ``progress(done, total)`` is called as the common part is compared (``-p``)."""
    size_a, size_b = a.virtual_size, b.virtual_size
    if strict and size_a != size_b:
        return CompareResult(False, ["Strict mode: Image size mismatch!"])
    common = min(size_a, size_b)
    buf_a = aligned_buffer(_CHUNK)
    buf_b = aligned_buffer(_CHUNK)
    for full_a, full_b, start, stop in _pieces(a, b, common):
        if strict and _status(a, full_a) != _status(b, full_b):
            return CompareResult(
                False, [f"Strict mode: Offset {start} block status mismatch!"], start
            )
        ea, eb = full_a.clip(start, stop), full_b.clip(start, stop)
        if progress:
            progress(stop, common)
        if ea.reads_zero and eb.reads_zero:
            continue
        pos = ea.start
        while pos < ea.end:
            n = min(_CHUNK, ea.end - pos)
            va, vb = buf_a[:n], buf_b[:n]
            a.read_extent(ea.clip(pos, pos + n), va)
            b.read_extent(eb.clip(pos, pos + n), vb)
            if _differs(va, vb):
                diff = np.flatnonzero(
                    np.frombuffer(va, dtype=np.uint8) != np.frombuffer(vb, dtype=np.uint8)
                )
                at = (pos + int(diff[0])) // _SECTOR * _SECTOR
                return CompareResult(False, [f"Content mismatch at offset {at}!"], at)
            pos += n
    messages: list[str] = []
    if size_a != size_b:
        messages.append("Warning: Image size mismatch!")
        larger = a if size_a > size_b else b
        nz = _first_nonzero(larger, common, larger.virtual_size)
        if nz is not None:
            at = nz // _SECTOR * _SECTOR
            messages.append(f"Content mismatch at offset {at}!")
            return CompareResult(False, messages, at)
    messages.append("Images are identical.")
    return CompareResult(True, messages)
