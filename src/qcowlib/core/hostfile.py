"""A host file opened for positional I/O, with bounds handled in one place."""

from __future__ import annotations

import errno
import functools
import mmap
import os
import stat
from collections.abc import Callable, Iterator

from qcowlib._log import get_logger
from qcowlib.errors import (
    QcowlibError,
    QcowlibFileNotFoundError,
    QcowlibIOError,
    QcowlibPermissionError,
    TruncatedImage,
)

log = get_logger(__name__)

# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def aligned_buffer(size: int) -> memoryview:
    """A zero-filled, writable buffer of ``size`` bytes starting on a page boundary.

    The kernel copies file data to and from user memory several times faster when the
    user buffer is aligned (measured here: 10.7 GB/s against 1.9 GB/s for a ``bytearray``,
    whose data starts 16 bytes into a page, on AMD EPYC), so every large I/O buffer is
    one of these.  Slicing it gives views, not copies.
    """
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


class HostFile:
    """An open file: ``pread`` into buffers, its size, and hole/data probing.

    Reads past the end of the file return zeros for the missing part, as a block device
    of the file's size padded with zeros would (QEMU's file driver does the same);
    callers that must not read past the end check :attr:`size` first.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        linked: bool = False,
        within: str | None = None,
    ) -> None:
        """Open ``path`` (read-only unless ``writable``).

        ``linked`` marks a file named *inside* an image (a backing, external data or
        extent file): it must be a regular file outside /proc and /sys, so a crafted
        image cannot make qcowlib read a device, a FIFO (which would hang), a socket,
        a directory or a kernel file such as ``/proc/self/mem``.  Such a file is
        checked before it is opened and again on the open descriptor.  ``within`` (a
        directory with its symlinks resolved) additionally requires the file the
        descriptor really refers to to lie inside that directory.
        """
        self.path = path = os.fspath(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        # Never block on open: a FIFO (or a tty) named as the image would wait for ever
        # for a writer (qemu-img hangs there); the flag is cleared once it is open.
        flags |= os.O_NONBLOCK | os.O_NOCTTY
        if linked:
            _refuse_special(path, os.stat)
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise QcowlibFileNotFoundError("no such file", file=path) from None
        except PermissionError as exc:
            raise QcowlibPermissionError(f"cannot open: {exc.strerror}", file=path) from None
        except IsADirectoryError:
            raise QcowlibIOError("is a directory", file=path) from None
        except OSError as exc:
            raise QcowlibIOError(f"cannot open: {exc.strerror}", file=path) from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise QcowlibIOError("is a directory", file=path)
            if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                # No offsets to read at: a stream is not an image (and would block).
                raise QcowlibIOError(f"is {_kind(st.st_mode)}, not a disk image", file=path)
            if linked:
                _refuse_special(path, lambda _: st)
                if within is not None:
                    _check_within(self.fd, path, within)
            _clear_nonblock(self.fd)
            size = _size_of(self.fd, st)
        except QcowlibError:
            os.close(self.fd)
            raise
        except OSError as exc:  # pragma: no cover - fstat/fcntl on an open fd
            os.close(self.fd)
            raise QcowlibIOError(f"cannot stat {path}: {exc.strerror}", file=path) from None
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.identity = (st.st_dev, st.st_ino)
        self.allocated = st.st_blocks * 512

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; zeros where the file ends early."""
        buf = bytearray(length)
        self.pread_into(offset, memoryview(buf))
        return bytes(buf)

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        """Like :meth:`pread` but a structure past the end of file is an error."""
        if offset < 0 or offset + length > self.size:
            raise TruncatedImage(
                f"{what} at {offset:#x} ({length} bytes) is past the end of the file",
                file=self.path,
                structure=what,
                offset=offset,
            )
        return self.pread(offset, length)

    def pread_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; the part past the end of file reads as zeros."""
        n = len(buf)
        done = 0
        try:
            while done < n:
                pos = offset + done
                if pos >= self.size:
                    break
                got = os.preadv(self.fd, [buf[done : min(n, done + (1 << 30))]], pos)
                if got == 0:
                    break
                done += got
        except OSError as exc:
            raise QcowlibIOError(
                f"read error: {exc.strerror}", errno=exc.errno, file=self.path, offset=offset
            ) from None
        if done < n:
            buf[done:] = bytes(n - done)

    def segments(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, stop, is_data)`` runs of ``[offset, end)`` from SEEK_DATA/SEEK_HOLE.

        Past the end of the file is a hole.  Where the file system cannot tell, the whole
        range is data.
        """
        pos = offset
        file_end = min(end, self.size)
        while pos < file_end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole remains
                yield pos, file_end, True
                pos = file_end
                break
            if data > pos:
                yield pos, min(data, file_end), False
                pos = min(data, file_end)
                if pos >= file_end:
                    break
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = file_end
            hole = min(max(hole, pos + 1), file_end)
            yield pos, hole, True
            pos = hole
        if pos < end:
            yield pos, end, False

    # -- writing (files opened ``writable``); :attr:`size` follows every extension ------
    def pwrite(self, offset: int, data: memoryview | bytes | bytearray) -> None:
        """Write all of ``data`` at ``offset``; raises :class:`QcowlibIOError` on failure."""
        if offset < 0:
            raise QcowlibIOError(f"negative write offset {offset}", file=self.path)
        try:
            pwrite_all(self.fd, data, offset)
        except QcowlibIOError as exc:
            raise exc.with_file(self.path) from None
        self.size = max(self.size, offset + memoryview(data).nbytes)

    def truncate(self, size: int) -> None:
        """Set the file's length (a hole when it grows).

        Raises :class:`QcowlibIOError` whose message is the system's error text.
        """
        try:
            os.ftruncate(self.fd, size)
        except (OSError, OverflowError) as exc:
            err = getattr(exc, "errno", None) or errno.EFBIG
            raise QcowlibIOError(os.strerror(err), errno=err, file=self.path) from None
        self.size = size

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate ``[offset, offset + length)`` inside the file (see :func:`punch_hole`)."""
        length = min(length, self.size - offset)
        return offset >= 0 and length > 0 and punch_hole(self.fd, offset, length)

    def sync(self) -> None:
        """Make everything written durable; raises :class:`QcowlibIOError` on failure."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise QcowlibIOError(
                f"flush failed: {exc.strerror}", errno=exc.errno, file=self.path
            ) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: Directories whose files are never linked files: kernel interfaces, not images.
_KERNEL_TREES = ("/proc", "/sys")


@functools.cache
def _kernel_devices() -> frozenset[int]:
    """The st_dev of procfs and sysfs as mounted here (also catches bind mounts)."""
    devs = set()
    for tree in _KERNEL_TREES:
        try:
            devs.add(os.stat(tree).st_dev)
        except OSError:
            continue
    return frozenset(devs)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _refuse_special(path: str, get_stat: Callable[[str], os.stat_result]) -> None:
    """Raise :class:`QcowlibIOError` unless ``path`` is a regular file outside the
    kernel's trees (``get_stat`` is ``os.stat`` before opening, the descriptor's
    ``fstat`` after)."""
    try:
        st = get_stat(path)
    except FileNotFoundError:
        raise QcowlibIOError("no such file", file=path) from None
    except OSError as exc:
        raise QcowlibIOError(f"cannot open: {exc.strerror}", file=path) from None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise QcowlibIOError(
            f"is {kind}: never opened as a backing, data or extent file", file=path
        )
    real = os.path.realpath(path)
    in_tree = any(real == t or real.startswith(t + "/") for t in _KERNEL_TREES)
    if in_tree or st.st_dev in _kernel_devices():
        raise QcowlibIOError(
            "is a kernel file (/proc, /sys): never opened as a backing, data or extent file",
            file=path,
        )


def refuse_special(path: str) -> None:
    """Raise :class:`QcowlibIOError` unless ``path`` may be opened as a linked file (a
    regular file outside /proc and /sys); for callers that open it some other way."""
    _refuse_special(path, os.stat)


def _size_of(fd: int, st: os.stat_result) -> int:
    """The size of an open file: ``st_size``, but a block device's (an LVM volume,
    a SAN LUN) own size, where ``st_size`` is 0."""
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def size_of(fd: int) -> int:
    """:func:`_size_of` of an open descriptor, for code that opens files itself."""
    return _size_of(fd, os.fstat(fd))


def _clear_nonblock(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def is_within(path: str, root: str) -> bool:
    """Whether the already resolved ``path`` lies inside the resolved directory ``root``."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_within(fd: int, path: str, root: str) -> None:
    """The file the descriptor refers to must lie under ``root`` (a symlink swapped in
    after the name was checked is caught here)."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(path)
    if not is_within(real, root):
        raise QcowlibIOError(f"resolves to {real}, outside {root}", file=path)


#: Most bytes handed to one write call.  Linux sizes the page-cache folios of a buffered
#: write by its length, and writes of 2 MiB or more get 2 MiB folios: on a VM whose
#: balloon reports free memory to the host (free page reporting), those come from the
#: large free blocks the host has taken back, and copying into them is 3-4x slower
#: while the host faults them in.  Measured here: 800 MB in 4 MiB writes took 2.7-3.9 s
#: in ten runs out of ten in a bad spell, in 1 MiB writes 0.46-0.70 s.
WRITE_MAX = 1 << 20


def pwrite_all(fd: int, data: memoryview | bytes | bytearray, offset: int) -> None:
    """Write all of ``data`` at ``offset``; raises :class:`QcowlibIOError` on failure."""
    view = memoryview(data).cast("B")
    done = 0
    try:
        while done < len(view):
            n = os.pwrite(fd, view[done : done + WRITE_MAX], offset + done)
            if n <= 0:
                raise QcowlibIOError(
                    "write error: the write made no progress", errno=errno.EIO, offset=offset + done
                )
            done += n
    except QcowlibIOError:
        raise
    except OSError as exc:
        raise QcowlibIOError(
            f"write error: {exc.strerror}", errno=exc.errno, offset=offset + done
        ) from None


def pwritev_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """Write ``parts`` back to back from ``offset``, at most :data:`WRITE_MAX` bytes a call.

    Raises :class:`QcowlibIOError` on failure.
    """
    batch: list[memoryview] = []
    size = 0
    start = offset
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            take = view[: WRITE_MAX - size]
            batch.append(take)
            size += len(take)
            view = view[len(take) :]
            if size == WRITE_MAX:
                _pwritev_batch(fd, batch, start, size)
                start += size
                batch, size = [], 0
    if batch:
        _pwritev_batch(fd, batch, start, size)


def _pwritev_batch(
    fd: int, batch: list[memoryview], offset: int, size: int, *, skip: int | None = None
) -> None:
    """One vectored write of ``batch`` (``size`` bytes); with ``skip``, only what is left
    after the first ``skip`` bytes (already written)."""
    if skip is not None:
        done = skip
    else:
        try:
            done = os.pwritev(fd, batch, offset) if len(batch) > 1 else 0
        except OSError as exc:
            raise QcowlibIOError(
                f"write error: {exc.strerror}", errno=exc.errno, offset=offset
            ) from None
    if done < size:  # a short vectored write (or a single part): finish it piece by piece
        pos = 0
        for view in batch:
            if pos + len(view) > done:
                skip = max(0, done - pos)
                pwrite_all(fd, view[skip:], offset + pos + skip)
            pos += len(view)


#: Offsets, lengths and buffer addresses of direct (O_DIRECT) writes are multiples of
#: this (the largest logical block size Linux file systems ask for).
DIRECT_ALIGN = 4096


def _address(view: memoryview) -> int | None:
    """The address of a writable buffer's first byte (None: read-only, not ours to use)."""
    import ctypes

    if view.readonly or not view.contiguous:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def _direct_ok(parts: list[memoryview], offset: int) -> bool:
    if offset % DIRECT_ALIGN:
        return False
    for view in parts:
        if len(view) % DIRECT_ALIGN:
            return False
        addr = _address(view)
        if addr is None or addr % DIRECT_ALIGN:
            return False
    return True


#: Smaller writes go through the page cache: a direct write waits for the device, and
#: a fragmented source's thousands of 4 KiB writes were bound by its latency (2x slower).
DIRECT_MIN = 64 * 1024


class DataWriter:
    """Writes the data of a new output file, large aligned writes bypassing the page cache.

    A new image is flushed to disk before it is renamed into place, so copying its data
    into the page cache first only costs time: the copy, and allocating the page cache,
    which on this kind of VM (free page reporting) is where most of a convert's kernel
    time went (measured: 1 GiB buffered then ``fdatasync``ed took 1.0-2.6 s and
    0.35-1.0 s of system time; written ``O_DIRECT`` in 1 MiB calls from two threads
    0.4-0.65 s and 0.06-0.1 s).  Writes of at least :data:`DIRECT_MIN` bytes whose
    offset, lengths and buffer addresses are multiples of :data:`DIRECT_ALIGN` go
    through a second descriptor opened with
    ``O_DIRECT`` (whole pages only, so they never share a page with a buffered write);
    everything else, and everything where the file system refuses ``O_DIRECT``, goes
    through ``fd`` as before.  Safe to use from several threads.
    """

    def __init__(self, fd: int, *, direct: bool = True) -> None:
        self.fd = fd
        self.direct_fd = _open_direct(fd) if direct else -1
        #: False once the file system has refused a direct write.
        self.use_direct = self.direct_fd >= 0

    def write(self, offset: int, parts: list[bytes | memoryview]) -> None:
        """Write ``parts`` back to back from ``offset`` (at most :data:`WRITE_MAX` bytes a
        call).  Raises :class:`QcowlibIOError` on failure."""
        if self.use_direct:
            views = [memoryview(p).cast("B") for p in parts]
            if (
                sum(map(len, views)) >= DIRECT_MIN
                and _direct_ok(views, offset)
                and self._write_direct(views, offset)
            ):
                return
        pwritev_all(self.fd, parts, offset)

    def _write_direct(self, views: list[memoryview], offset: int) -> bool:
        """Whole pages through the O_DIRECT descriptor; False (nothing written) where
        the file system refuses them, which turns direct writes off."""
        batch: list[memoryview] = []
        size = 0
        pos = offset
        first = True
        for view in views:
            while view:
                take = view[: WRITE_MAX - size]
                batch.append(take)
                size += len(take)
                view = view[len(take) :]
                if size == WRITE_MAX:
                    if not self._direct_batch(batch, pos, size, first):
                        return False
                    first = False
                    pos += size
                    batch, size = [], 0
        return not batch or self._direct_batch(batch, pos, size, first)

    def _direct_batch(self, batch: list[memoryview], offset: int, size: int, first: bool) -> bool:
        fd = self.direct_fd
        try:
            done = os.pwritev(fd, batch, offset)
        except OSError as exc:
            if first and exc.errno == errno.EINVAL:
                log.debug("O_DIRECT writes refused here, writing through the page cache")
                self.use_direct = False
                return False
            raise QcowlibIOError(
                f"write error: {exc.strerror}", errno=exc.errno, offset=offset
            ) from None
        if done < size:  # short (a full disk?): finish through the page cache
            _pwritev_batch(self.fd, batch, offset, size, skip=done)
        return True

    def close(self) -> None:
        """Close the direct descriptor (the caller's ``fd`` stays open)."""
        fd, self.direct_fd = self.direct_fd, -1
        self.use_direct = False
        if fd >= 0:
            os.close(fd)


def _open_direct(fd: int) -> int:
    """A second descriptor of ``fd``'s file opened for ``O_DIRECT`` writes, or -1."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return -1
        direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("no O_DIRECT descriptor for the output: %s", exc.strerror)
        return -1
    if os.fstat(direct).st_ino != st.st_ino:  # pragma: no cover - /proc lied
        os.close(direct)
        return -1
    return direct


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """Linux ``fallocate(2)`` through libc, or None where it is missing."""
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int

    def call(fd: int, mode: int, offset: int, length: int) -> int:
        return 0 if func(fd, mode, offset, length) == 0 else ctypes.get_errno()

    return call


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give ``[offset, offset + length)`` of a file back to the file system, keeping the
    file's size (the range then reads as zeros).  Best effort, as QEMU's discard: False
    where the system or file system cannot."""
    call = _fallocate()
    if call is None or length <= 0:
        return False
    err = call(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if err:
        log.debug("no hole punched at %#x+%#x: %s", offset, length, os.strerror(err))
    return not err
