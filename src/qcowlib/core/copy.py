"""Data movement from a disk's extents into a raw output, holes left as holes."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from qcowlib.core.disk import Disk, Extent, ExtentKind
from qcowlib.core.hostfile import aligned_buffer, pwrite_all
from qcowlib.core.zero import nonzero_runs
from qcowlib.errors import QcowlibIOError

#: Bytes moved per task; each worker reuses one buffer of this size.
CHUNK = 4 * 1024 * 1024
#: Worker threads: reads, zero scans and writes release the GIL, so two keep both
#: cores busy; more only adds memory.
WORKERS = 2

Progress = Callable[[int, int], None]


def _copy_range_kernel(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> bool:
    """Copy with ``copy_file_range``; False when the kernel cannot (then use read/write)."""
    done = 0
    while done < n:
        try:
            got = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
        except OSError as exc:
            if done == 0:
                return False  # not supported here: the caller reads and writes instead
            raise QcowlibIOError(f"copy failed: {exc.strerror}", offset=dst_off + done) from None
        if got == 0:
            break
        done += got
    return done == n


def _pieces(disk: Disk) -> Iterator[Extent]:
    """Data extents of ``disk`` cut into pieces of at most :data:`CHUNK` bytes."""
    for ext in disk.extents():
        if ext.reads_zero:
            continue
        pos = ext.start
        while pos < ext.end:
            n = min(CHUNK, ext.end - pos)
            yield ext if n == ext.length else ext.clip(pos, pos + n)
            pos += n


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
    extents are copied as they are, in the kernel where possible.  Pieces are processed
    by :data:`WORKERS` threads with at most ``2 * WORKERS`` buffers in flight.
    """
    total = disk.virtual_size
    try:
        os.ftruncate(fd, total)
    except OSError as exc:
        raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None
    local = threading.local()

    def work(piece: Extent) -> int:
        """Copy one piece; returns the guest offset it ends at (for progress)."""
        if sparse_size == 0 and piece.kind is ExtentKind.DATA and piece.host_offset is not None:
            host = disk.chain[piece.depth].host_file_for(piece)
            if host is not None and _copy_range_kernel(
                host.fd, piece.host_offset, fd, piece.start, piece.length
            ):
                return piece.end
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = aligned_buffer(CHUNK)
        view = buf[: piece.length]
        disk.read_extent(piece, view)
        try:
            if sparse_size:
                for s, e in nonzero_runs(view, sparse_size):
                    pwrite_all(fd, view[s:e], piece.start + s)
            else:
                pwrite_all(fd, view, piece.start)
        except OSError as exc:
            raise QcowlibIOError(f"write error: {exc.strerror}", offset=piece.start) from None
        return piece.end

    pending: deque[Future[int]] = deque()
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="qcowlib-copy") as pool:
        try:
            for piece in _pieces(disk):
                pending.append(pool.submit(work, piece))
                if len(pending) >= 2 * WORKERS:
                    reached = pending.popleft().result()
                    if progress:
                        progress(reached, total)
            while pending:
                reached = pending.popleft().result()
                if progress:
                    progress(reached, total)
        finally:
            for f in pending:
                f.cancel()
    if progress:
        progress(total, total)
