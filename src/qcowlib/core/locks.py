"""QEMU's image locks: OFD locks on the bytes its file driver uses (block/file-posix.c).

A process that opens an image takes shared locks on byte 100 + P for each permission P
it wants and on byte 200 + P for each permission it refuses to share; another process
tests for conflicting locks on the opposite bytes.  Taking the same locks as QEMU means
an image a running VM holds for writing is refused, and the VM cannot open an image
qcowlib is reading or writing.

What qemu-img 7.2 takes (seen in ``/proc/locks``):

* a reader (``info``, ``convert``'s source, every backing file of a chain, also under a
  writer): wants ``consistent read``, shares everything but ``write`` and ``resize``:
  bytes 100, 201, 203.  With ``-U`` (force-share) it shares everything: byte 100 only.
* a writer (``qemu-io``, ``commit``, ``check -r``, a running VM): wants ``consistent
  read``, ``write`` and ``resize``, shares ``consistent read`` and ``write unchanged``:
  bytes 100, 101, 103, 201, 203.

The messages are qemu-img's: ``Failed to get "write" lock`` when another process refuses
to share a permission we want, ``Failed to get shared "write" lock`` when another process
holds a permission we refuse to share.
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

__all__ = [
    "READ_PERMS",
    "READ_SHARED",
    "WRITE_PERMS",
    "WRITE_SHARED",
    "check_conflicts",
    "check_output_unlocked",
    "take_locks",
    "take_read_locks",
    "take_write_locks",
]

# QEMU block/file-posix.c and include/block/block.h: permission bits, their names as
# bdrv_perm_names() spells them, and where their lock bytes live.
PERM_CONSISTENT_READ: Final = 0
PERM_WRITE: Final = 1
PERM_WRITE_UNCHANGED: Final = 2
PERM_RESIZE: Final = 3
PERM_NAMES: Final = ("consistent read", "write", "write unchanged", "resize")
ALL_PERMS: Final = frozenset(range(len(PERM_NAMES)))
LOCK_PERM_BASE: Final = 100
LOCK_SHARED_BASE: Final = 200
_FLOCK = struct.Struct("@hhqqi4x")

#: A reader's permissions and what it shares (qemu-img's read-only opens).
READ_PERMS: Final = frozenset({PERM_CONSISTENT_READ})
READ_SHARED: Final = frozenset({PERM_CONSISTENT_READ, PERM_WRITE_UNCHANGED})
#: A writer's permissions and what it shares.
WRITE_PERMS: Final = frozenset({PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE})
WRITE_SHARED: Final = frozenset({PERM_CONSISTENT_READ, PERM_WRITE_UNCHANGED})


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


def _locked(message: str, path: str) -> ImageLocked:
    return ImageLocked(f"{message}: is another process using the image [{path}]?", file=path)


def check_conflicts(fd: int, path: str, perms: frozenset[int], shared: frozenset[int]) -> None:
    """Raise :class:`ImageLocked` (qemu-img's words) when another open file of the image
    refuses to share one of ``perms`` or holds a permission not in ``shared``.

    The order is QEMU's ``raw_check_lock_bytes``: wanted permissions first, then the
    shared ones, each lowest bit first.  Our own locks never conflict with this test.
    """
    for perm in sorted(perms):
        if not _ofd_lock(fd, fcntl.F_WRLCK, LOCK_SHARED_BASE + perm, test=True):
            raise _locked(f'Failed to get "{PERM_NAMES[perm]}" lock', path)
    for perm in sorted(ALL_PERMS - shared):
        if not _ofd_lock(fd, fcntl.F_WRLCK, LOCK_PERM_BASE + perm, test=True):
            raise _locked(f'Failed to get shared "{PERM_NAMES[perm]}" lock', path)


def take_locks(fd: int, path: str, perms: frozenset[int], shared: frozenset[int]) -> None:
    """Lock an open image as QEMU does for ``perms`` sharing ``shared``, or raise
    :class:`ImageLocked` with qemu-img's message.

    As QEMU does, our shared locks are set first and conflicts tested after, so two
    processes racing each other both see the other.  The locks live as long as ``fd``.
    """
    unshared = ALL_PERMS - shared
    for byte in [LOCK_PERM_BASE + p for p in sorted(perms)] + [
        LOCK_SHARED_BASE + p for p in sorted(unshared)
    ]:
        if not _ofd_lock(fd, fcntl.F_RDLCK, byte):
            raise _locked(f"Failed to lock byte {byte}", path)
    check_conflicts(fd, path, perms, shared)


def take_read_locks(fd: int, path: str, *, force_share: bool = False) -> None:
    """Lock an image for reading as qemu-img does; ``force_share`` is its ``-U``.

    Raises :class:`ImageLocked` (``Failed to get shared "write" lock``) when another
    process has the image open for writing, unless ``force_share``.
    """
    take_locks(fd, path, READ_PERMS, ALL_PERMS if force_share else READ_SHARED)


def take_write_locks(fd: int, path: str) -> None:
    """Lock an image the way a QEMU writer does, or raise :class:`ImageLocked`.

    We want read, write and resize and share only consistent read and unchanged
    writes: nobody else may hold "write" or "resize" (bytes 101/103), nor have refused
    to share what we want (bytes 200/201/203).
    """
    take_locks(fd, path, WRITE_PERMS, WRITE_SHARED)


def check_output_unlocked(path: str) -> None:
    """Refuse to replace an existing output file that QEMU holds (a running VM's disk),
    as ``qemu-img convert`` refuses: ``Failed to get "write" lock``.

    Opens ``path`` read-only just to test the lock bytes (nothing is taken); a path
    that does not exist, or is not a regular file, has nothing to test.
    """
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return  # devices are written in place; qemu-img does not lock them either
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return  # nothing there, or not readable by us: nothing we can test
    try:
        check_conflicts(fd, path, WRITE_PERMS, WRITE_SHARED)
    finally:
        os.close(fd)
