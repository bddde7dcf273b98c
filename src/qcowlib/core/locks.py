"""QEMU's image locks: OFD locks on the bytes its file driver uses (block/file-posix.c).

A process that opens an image takes shared locks on byte 100 + P for each permission P
it wants and on byte 200 + P for each permission it refuses to share; another process
tests for conflicting locks on the opposite bytes.  Taking the same locks as QEMU means
an image a running VM holds for writing is refused, and the VM cannot open an image
qcowlib is writing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Final

from qcowlib._log import get_logger
from qcowlib.errors import ImageLocked

log = get_logger(__name__)

__all__ = ["take_write_locks"]

# QEMU block/file-posix.c: permission bits and where their lock bytes live.
PERM_CONSISTENT_READ: Final = 0
PERM_WRITE: Final = 1
PERM_WRITE_UNCHANGED: Final = 2
PERM_RESIZE: Final = 3
LOCK_PERM_BASE: Final = 100
LOCK_SHARED_BASE: Final = 200
_FLOCK = struct.Struct("@hhqqi4x")


def _ofd_lock(fd: int, kind: int, byte: int, *, test: bool = False) -> bool:
    """Take (or with ``test``, probe) an OFD lock on one byte; False on a conflict.

    File systems without OFD locks cannot enforce anything: that is logged and treated
    as no conflict (QEMU too runs without locking there).
    """
    cmd = fcntl.F_OFD_GETLK if test else fcntl.F_OFD_SETLK
    req = _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)
    try:
        out = fcntl.fcntl(fd, cmd, req)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        log.debug("image locking unavailable: %s", exc.strerror)
        return True
    if test:
        return bool(_FLOCK.unpack(out)[0] == fcntl.F_UNLCK)
    return True


def take_write_locks(fd: int, path: str) -> None:
    """Lock an image the way a QEMU writer does, or raise :class:`ImageLocked`.

    We want read, write and resize and share only consistent read and unchanged
    writes.  As QEMU does, our shared locks are set first and conflicts tested after,
    so two writers racing each other both see the other (a lock of our own open file
    never conflicts with our test): nobody else may hold "write" or "resize" (bytes
    101/103), nor have refused to share what we want (bytes 200/201/203).
    """
    want = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE)
    unshared = (PERM_WRITE, PERM_RESIZE)
    for byte in [LOCK_PERM_BASE + p for p in want] + [LOCK_SHARED_BASE + p for p in unshared]:
        if not _ofd_lock(fd, fcntl.F_RDLCK, byte):
            raise ImageLocked("image is locked by another process", file=path)
    for perm in want:
        if not _ofd_lock(fd, fcntl.F_WRLCK, LOCK_SHARED_BASE + perm, test=True):
            raise ImageLocked(
                "image is in use by another process (it does not share write access)",
                file=path,
            )
    for perm in unshared:
        if not _ofd_lock(fd, fcntl.F_WRLCK, LOCK_PERM_BASE + perm, test=True):
            raise ImageLocked("image is open for writing by another process", file=path)
