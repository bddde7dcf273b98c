"""Writing outputs under a temporary name, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator

from qcowlib._log import get_logger
from qcowlib.core.locks import check_output_unlocked
from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError

log = get_logger(__name__)

#: Seconds between writeback kicks while an output is being written.
WRITEBACK_INTERVAL = 0.1
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int], None] | None:
    """Linux ``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``, or None elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int

    def kick(fd: int) -> None:
        func(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)

    return kick


class _Writeback:
    """Starts writeback of an output's dirty pages while it is being written.

    The final ``fdatasync`` then waits for little instead of the whole file, and the
    disk works while the CPU still reads and classifies (QEMU gets the same overlap from
    its periodic flushes).  The kicks never wait for the disk and change no data.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        kick = _sync_file_range()
        if kick is not None:
            self.thread = threading.Thread(
                target=self._run, args=(kick,), name="qcowlib-writeback", daemon=True
            )
            self.thread.start()

    def _run(self, kick: Callable[[int], None]) -> None:
        while not self.stop.wait(WRITEBACK_INTERVAL):
            kick(self.fd)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same existing file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_output(path: str, *, protect: tuple[str, ...] = ()) -> Iterator[int]:
    """Yield a file descriptor for a new file that appears at ``path`` only on success.

    The data is flushed to disk before the rename, and the directory after it.
    ``protect`` lists input files that ``path`` must not name (an output never replaces
    its own source).  Character and block devices are written in place.
    """
    for src in protect:
        if same_file(path, src):
            raise InvalidArgument(f"output {path} is the same file as input {src}")
    check_output_unlocked(path)  # a file a running VM holds is never replaced
    try:
        st = os.stat(path)
        is_device = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
    except FileNotFoundError:
        is_device = False
    except OSError as exc:
        raise QcowlibIOError(f"cannot stat {path}: {exc.strerror}", file=path) from None
    if is_device:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise QcowlibIOError(f"cannot open {path}: {exc.strerror}", file=path) from None
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".qcowlib-tmp"
        )
    except OSError as exc:
        raise QcowlibIOError(
            f"cannot create output in {directory}: {exc.strerror}", file=path
        ) from None
    ok = False
    writeback = _Writeback(fd)
    try:
        try:
            yield fd
        finally:
            writeback.close()
        os.fdatasync(fd)
        os.fchmod(fd, 0o644 & ~_umask())
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        ok = True
        _sync_directory(directory)
    except QcowlibError:
        raise
    except OSError as exc:
        raise QcowlibIOError(f"cannot write {path}: {exc.strerror}", file=path) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _sync_directory(directory: str) -> None:
    """Make the rename itself durable (best effort: not every file system can)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("cannot open %s to sync it: %s", directory, exc.strerror)
        return
    try:
        os.fsync(dfd)
    except OSError as exc:
        log.debug("cannot sync directory %s: %s", directory, exc.strerror)
    finally:
        os.close(dfd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
