"""Writing outputs under a temporary name, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator

from qcowlib._log import get_logger
from qcowlib.core import interrupt
from qcowlib.core.locks import check_output_unlocked
from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError, os_error

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

    As ``qemu-img`` (which truncates the existing file), writing over a file keeps its
    permission bits and, where the system allows, its owner and group; a symlink is
    written through (the link stays, its target gets the new content).  On any error,
    Ctrl-C, or a signal :mod:`qcowlib.core.interrupt` turns into an exception, the
    temporary file is removed.  Errors name ``path`` and say why (the system's text).
    """
    for src in protect:
        if same_file(path, src):
            raise InvalidArgument(f"output {path} is the same file as input {src}")
    check_output_unlocked(path)  # a file a running VM holds is never replaced
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        existing: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise QcowlibIOError(f"cannot stat {path}: {exc.strerror}", file=path) from None
    try:
        if existing is not None and (
            stat.S_ISBLK(existing.st_mode) or stat.S_ISCHR(existing.st_mode)
        ):
            with _device_output(target) as fd:
                yield fd
        else:
            with _renamed_output(target, existing) as fd:
                yield fd
    except QcowlibIOError as exc:  # a write error: name the output (not its temp name)
        raise exc.with_file(path) from None
    except QcowlibError:
        raise
    except OSError as exc:
        raise os_error(exc, f"cannot write: {exc.strerror}", file=path) from None


@contextlib.contextmanager
def _device_output(path: str) -> Iterator[int]:
    """A character or block device, written in place (no temporary name)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(exc, f"cannot open: {exc.strerror}", file=path) from None
    try:
        yield fd
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _renamed_output(target: str, existing: os.stat_result | None) -> Iterator[int]:
    """A temporary file beside ``target``, renamed over it when the body succeeds."""
    directory = os.path.dirname(target) or "."
    fd, tmp, ok = -1, "", False
    try:
        with interrupt.deferred():  # a signal right after mkstemp must not leak the file
            try:
                fd, tmp = tempfile.mkstemp(
                    dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".qcowlib-tmp"
                )
            except OSError as exc:
                raise QcowlibIOError(
                    f"cannot create output in {directory}: {exc.strerror}", errno=exc.errno
                ) from None
        writeback = _Writeback(fd)
        try:
            yield fd
        finally:
            writeback.close()
        os.fdatasync(fd)
        _copy_identity(fd, existing, target)
        with interrupt.deferred():
            interrupt.checkpoint()  # interrupted before the rename: no output
            os.close(fd)
            fd = -1
            os.replace(tmp, target)
            ok = True
        _sync_directory(directory)
    finally:
        if not ok:
            with interrupt.deferred():  # clean-up is not cut short by a signal
                if fd >= 0:
                    os.close(fd)
                if tmp:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)


def _copy_identity(fd: int, existing: os.stat_result | None, target: str) -> None:
    """Give the new file the mode and owner of the file it replaces (a new file gets
    0644 less the umask, as qemu-img creates it).  Set-user-ID and set-group-ID bits
    are not carried over (the kernel clears them when such a file is written)."""
    if existing is None:
        os.fchmod(fd, 0o644 & ~_umask())
        return
    uid, gid = existing.st_uid, existing.st_gid
    if (uid, gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, uid, gid)
        except PermissionError:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, gid)  # a group we belong to, at least
            log.warning(
                "%s: owner %d:%d not kept (only root may give a file away); "
                "the new file belongs to %d",
                target, uid, gid, os.geteuid(),
            )  # fmt: skip
    os.fchmod(fd, stat.S_IMODE(existing.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


@contextlib.contextmanager
def atomic_outputs(paths: list[str], *, protect: tuple[str, ...] = ()) -> Iterator[list[int]]:
    """:func:`atomic_output` for an image of several files (a descriptor and its
    extents): yield one file descriptor per path; every file is written under a
    temporary name, and only once all are complete and flushed are they renamed into
    place, in the order given (so list the file that names the others last: it appears
    only when they are there).  On failure no temporary file is left."""
    with contextlib.ExitStack() as stack:
        if len({os.path.abspath(p) for p in paths}) != len(paths):
            raise InvalidArgument("an output file is named twice")
        fds: list[int] = []
        # An ExitStack leaves its contexts last-entered first: enter the last path
        # first, so that it is renamed into place last.
        for path in reversed(paths):
            fds.append(stack.enter_context(atomic_output(path, protect=protect)))
        yield fds[::-1]


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
