"""``checksum``: digests of an image file as stored, and of the disk it holds.

Two kinds of digest, in the structure the contract gives ``checksum --output json``::

    {"file": {ALGO: HEX, ...}, "content": {ALGO: HEX, ...}, "size": N}

``file``
    Over the file's bytes exactly as stored, read once from start to end: what a server
    receiving an upload of the file computes (Glance: ``checksum`` is the md5,
    ``os_hash_value`` the sha512).
``content`` (only when asked)
    Over the guest-visible disk, all ``virtual-size`` bytes, through the backing chain:
    the same for one disk in any format, cluster size, compression or chain layout.
    Zero and unallocated runs are fed as zeros without being read.
``size``
    The file's size in bytes (the bytes the ``file`` digests cover, Glance's ``size``),
    with or without ``content``.  The virtual size is ``info``'s ``virtual-size``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable
from typing import NotRequired, TypedDict

from qcowlib.core.chain import BackingPolicy
from qcowlib.core.digest import DEFAULT_ALGORITHMS, MultiHasher, check_algorithms
from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import HostFile, aligned_buffer
from qcowlib.core.locks import take_read_locks
from qcowlib.errors import QcowlibIOError
from qcowlib.formats.opener import open_disk

#: Bytes per read; one buffer of this size is reused for the whole pass.
READ_CHUNK = 8 * 1024 * 1024
#: Zero runs shorter than this are copied into the read buffer with the data around
#: them, so that a disk of many small extents is still hashed in large buffers.
ZERO_INLINE = 1024 * 1024


class ChecksumResult(TypedDict):
    """What :func:`checksum` returns (the ``checksum --output json`` object)."""

    file: dict[str, str]
    content: NotRequired[dict[str, str]]
    size: int


def checksum(
    path: str | os.PathLike[str],
    algos: Iterable[str] = DEFAULT_ALGORITHMS,
    *,
    content: bool = False,
    content_algos: Iterable[str] | None = None,
    fmt: str | None = None,
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ChecksumResult:
    """Digests of the file at ``path`` as stored and, if asked, of the disk it holds.

    ``algos`` are names from :data:`qcowlib.core.digest.ALGORITHMS`.  Content digests
    are computed when ``content`` is true or ``content_algos`` is given (default: the
    same algorithms as ``algos``); ``fmt`` forces the image format for them (probed from
    the content otherwise) and the backing chain is followed as ``backing_policy``
    allows (``follow``, as ``qemu-img`` does, ``contained`` or ``none``).  The file is
    read under qemu-img's shared read locks: :class:`~qcowlib.errors.ImageLocked` when
    another process has it open for writing, unless ``force_share``.  ``progress(done,
    total)`` is told the bytes read (file, then disk) as they go.

    Raises :class:`InvalidArgument` for unknown algorithm names or format,
    :class:`QcowlibIOError` when the file cannot be read, and for ``content`` whatever
    :func:`qcowlib.formats.opener.open_disk` and reading the disk raise (all
    :class:`QcowlibError`).
    """
    path = os.fspath(path)
    file_names = check_algorithms(algos)
    want_content = content or content_algos is not None
    file_size = os.stat(path).st_size if progress is not None and os.path.isfile(path) else 0
    if not want_content:
        with MultiHasher(file_names) as hasher:
            size = hash_file(
                path, hasher, force_share=force_share, progress=_tell(progress, 0, file_size)
            )
            return {"file": hasher.hexdigests(), "size": size}

    content_names = check_algorithms(file_names if content_algos is None else content_algos)
    _refuse_directory(path)
    # Open the image before the long file pass, so that a bad image fails fast.
    with open_disk(path, fmt, backing_policy, force_share=force_share) as disk:
        file_digests, size, content_digests = _file_pass(
            path, disk, file_names, content_names, file_size, progress
        )
        if content_digests is None:
            with MultiHasher(content_names) as hasher:
                hash_disk(disk, hasher, progress=_tell(progress, size, size + disk.virtual_size))
                content_digests = hasher.hexdigests()
        return {"file": file_digests, "content": content_digests, "size": size}


def _file_pass(
    path: str,
    disk: Disk,
    file_names: tuple[str, ...],
    content_names: tuple[str, ...],
    file_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[dict[str, str], int, dict[str, str] | None]:
    """The file's digests and size, and the content's when one pass gives both (a raw
    file of whole sectors *is* its disk); None for the content otherwise."""
    if not disk.file_is_disk:
        total = file_size + disk.virtual_size
        with MultiHasher(file_names) as hasher:
            size = hash_file(path, hasher, progress=_tell(progress, 0, total))
            return hasher.hexdigests(), size, None
    extra = tuple(n for n in content_names if n not in file_names)
    with MultiHasher(file_names + extra) as hasher:
        size = hash_file(path, hasher, progress=_tell(progress, 0, file_size))
        both = hasher.hexdigests()
    file_digests = {n: both[n] for n in file_names}
    if size != disk.virtual_size:
        return file_digests, size, None  # the file changed size under us: the long way
    return file_digests, size, {n: both[n] for n in content_names}


def _tell(
    progress: Callable[[int, int], None] | None, before: int, total: int
) -> Callable[[int], None] | None:
    """``progress`` for one pass that starts after ``before`` bytes of ``total``."""
    if progress is None:
        return None
    return lambda done: progress(min(before + done, total), total)


def _refuse_directory(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # reported when the file is opened
    if stat.S_ISDIR(mode):
        raise QcowlibIOError(f"{path} is a directory", file=path)


def hash_file(
    path: str,
    hasher: MultiHasher,
    *,
    chunk: int = READ_CHUNK,
    force_share: bool = True,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Feed the bytes of the file at ``path`` to ``hasher``, start to end; returns the count.

    Reads until end of file rather than trusting the size from ``stat``, so block
    devices and files that grow while being read are hashed as read; a character
    device (``/dev/zero`` never ends) only as far as its size, as the readers see it.
    FIFOs and sockets are refused (:class:`~qcowlib.core.hostfile.HostFile`).  Unless
    ``force_share``, the file is locked as qemu-img locks what it reads (raises
    :class:`~qcowlib.errors.ImageLocked` when another process writes it).  Raises
    :class:`QcowlibIOError`.
    """
    host = HostFile(path)
    try:
        fd = host.fd
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise QcowlibIOError(f"{path} is a directory", file=path)
        limit = None if stat.S_ISREG(mode) or stat.S_ISBLK(mode) else host.size
        if not force_share:
            take_read_locks(fd, path)
        with contextlib.suppress(OSError, AttributeError):  # advice only
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        view = aligned_buffer(chunk)
        offset = 0
        while limit is None or offset < limit:
            want = view if limit is None else view[: min(len(view), limit - offset)]
            try:
                got = os.preadv(fd, [want], offset)
            except OSError as exc:
                raise QcowlibIOError(
                    f"read error at {offset:#x}: {exc.strerror}", file=path, offset=offset
                ) from None
            if got == 0:
                return offset
            hasher.update(view[:got])
            offset += got
            if progress is not None:
                progress(offset)
        return offset
    finally:
        host.close()


def hash_disk(
    disk: Disk,
    hasher: MultiHasher,
    *,
    chunk: int = READ_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Feed ``disk``'s guest-visible bytes (all of its virtual size) to ``hasher``.

    Data is read extent by extent into one reused buffer, straight from the layer of the
    chain that holds it; long zero and unallocated runs are fed as zeros without reading.
    Raises what reading the disk raises (:class:`QcowlibError` subclasses).
    """
    view = aligned_buffer(chunk)
    fill = 0
    for ext in disk.extents():
        if ext.reads_zero and ext.length >= ZERO_INLINE:
            if fill:
                hasher.update(view[:fill])
                fill = 0
            hasher.update_zeros(ext.length)
            if progress is not None:
                progress(ext.end)
            continue
        pos = ext.start
        while pos < ext.end:
            n = min(chunk - fill, ext.end - pos)
            part = view[fill : fill + n]
            if ext.reads_zero:
                part[:] = bytes(n)  # n < ZERO_INLINE
            else:
                disk.read_extent(ext if n == ext.length else ext.clip(pos, pos + n), part)
            fill += n
            pos += n
            if fill == chunk:
                hasher.update(view)
                fill = 0
                if progress is not None:
                    progress(pos)
    if fill:
        hasher.update(view[:fill])
    if progress is not None:
        progress(disk.virtual_size)
