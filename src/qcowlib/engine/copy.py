"""Data movement from a disk's extents into a raw output, holes left as holes."""

from __future__ import annotations

import os
from collections.abc import Callable

from qcowlib.disk.base import Disk, ExtentKind
from qcowlib.engine.output import pwrite_all
from qcowlib.engine.zero import nonzero_runs
from qcowlib.errors import QcowlibIOError

#: Bytes moved per read; one buffer of this size is reused for the whole copy.
CHUNK = 8 * 1024 * 1024

Progress = Callable[[int, int], None]


def _copy_range_kernel(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> bool:
    """Copy with ``copy_file_range``; False when the kernel cannot (then use read/write)."""
    done = 0
    while done < n:
        try:
            got = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
        except OSError:
            if done == 0:
                return False
            raise
        if got == 0:
            break
        done += got
    return done == n


def write_raw(
    disk: Disk,
    fd: int,
    *,
    sparse_size: int = 4096,
    progress: Progress | None = None,
) -> None:
    """Write ``disk``'s guest-visible bytes into ``fd`` as a sparse raw image.

    Zero and unallocated extents are not written (the file is truncated to size first,
    so they read as zeros).  With ``sparse_size`` > 0, data is also scanned in blocks of
    that size and all-zero blocks are skipped, as ``qemu-img convert -S``; with 0, data
    extents are copied as they are, in the kernel where possible.
    """
    total = disk.virtual_size
    try:
        os.ftruncate(fd, total)
    except OSError as exc:
        raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None
    buf = bytearray(CHUNK)
    done = 0
    for ext in disk.extents():
        if ext.reads_zero:
            done += ext.length
            if progress:
                progress(done, total)
            continue
        if sparse_size == 0 and ext.kind is ExtentKind.DATA and ext.host_offset is not None:
            host = disk.chain[ext.depth].host_file_for(ext)
            if host is not None and _copy_range_kernel(
                host.fd, ext.host_offset, fd, ext.start, ext.length
            ):
                done += ext.length
                if progress:
                    progress(done, total)
                continue
        pos = ext.start
        while pos < ext.end:
            n = min(CHUNK, ext.end - pos)
            view = memoryview(buf)[:n]
            disk.read_extent(ext.clip(pos, pos + n), view)
            try:
                if sparse_size:
                    for s, e in nonzero_runs(view, sparse_size):
                        pwrite_all(fd, view[s:e], pos + s)
                else:
                    pwrite_all(fd, view, pos)
            except OSError as exc:
                raise QcowlibIOError(f"write error: {exc.strerror}", offset=pos) from None
            pos += n
            done += n
            if progress:
                progress(done, total)
