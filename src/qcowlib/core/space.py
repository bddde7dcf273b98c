"""Space in a new output file: reserving blocks, qemu's ``preallocation=`` modes and the
first block QEMU's file driver writes (punching holes stays with
:mod:`qcowlib.core.hostfile`, whose files use it)."""

from __future__ import annotations

import errno
import os

from qcowlib._log import get_logger
from qcowlib.core.hostfile import pwrite_all
from qcowlib.errors import QcowlibIOError

__all__ = ["FILE_PREALLOCATION", "allocate_first_block", "preallocate", "reserve"]

log = get_logger(__name__)


def reserve(fd: int, offset: int, length: int) -> None:
    """Best-effort ``posix_fallocate``: file systems without it just skip the hint."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        log.debug("no preallocation of the output: %s", exc.strerror)


#: ``preallocation=`` modes that allocate the file's data area (``metadata`` is the
#: format's business: its tables, not the file's blocks).
FILE_PREALLOCATION = ("falloc", "full")


def preallocate(fd: int, start: int, end: int, mode: str) -> None:
    """Allocate ``[start, end)`` of ``fd`` as qemu's ``preallocation=`` does, keeping
    what is written there: ``falloc`` reserves the blocks (``posix_fallocate``: they
    read as zeros, ``du`` counts them), ``full`` writes zeros into every hole.  Other
    modes do nothing.  Raises :class:`QcowlibIOError` when the file system refuses."""
    if mode not in FILE_PREALLOCATION or end <= start:
        return
    try:
        if mode == "falloc":
            os.posix_fallocate(fd, start, end - start)
            return
        for hole, hole_end in _holes(fd, start, end):
            zero = bytes(min(1 << 20, hole_end - hole))
            for pos in range(hole, hole_end, len(zero)):
                pwrite_all(fd, zero[: min(len(zero), hole_end - pos)], pos)
    except OSError as exc:
        raise QcowlibIOError(f"cannot preallocate: {exc.strerror}") from None


def _holes(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The holes of ``fd`` in ``[start, end)`` (none where holes are not reported: file
    systems without ``SEEK_HOLE`` report the whole file as data, and data must never
    be overwritten)."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            return out
        if hole >= end:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:
            data = end  # ENXIO: nothing but a hole to the end of the file
        out.append((hole, min(data, end)))
        pos = data
    return out


def allocate_first_block(fd: int, size: int) -> None:
    """Write zeros over the first 4 KiB of a new file of ``size`` bytes where they are
    a hole, as QEMU's file driver does for every file it creates (so that alignment
    probing works): ``map`` and ``du`` of the output then match qemu-img's."""
    n = min(4096, size)
    if n <= 0:
        return
    try:
        if os.lseek(fd, 0, os.SEEK_DATA) < n:
            return
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            return  # holes not reported (a device): its first block may hold data
    pwrite_all(fd, bytes(n), 0)
