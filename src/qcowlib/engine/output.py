"""Writing outputs under a temporary name, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator

from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same existing file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_output(path: str, *, protect: tuple[str, ...] = ()) -> Iterator[int]:
    """Yield a file descriptor for a new file that appears at ``path`` only on success.

    The data is flushed to disk before the rename.  ``protect`` lists input files that
    ``path`` must not name (an output never replaces its own source).  Character and
    block devices are written in place.
    """
    for src in protect:
        if same_file(path, src):
            raise InvalidArgument(f"output {path} is the same file as input {src}")
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
    try:
        yield fd
        os.fdatasync(fd)
        os.fchmod(fd, 0o644 & ~_umask())
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        ok = True
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
