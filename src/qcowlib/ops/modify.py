"""In-place operations: ``resize``, ``rebase`` and ``commit`` (as qemu-img does them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from qcowlib.core import interrupt
from qcowlib.core.chain import BackingPolicy, as_policy, resolve_linked_path
from qcowlib.core.disk import Disk, ExtentKind, Writer
from qcowlib.core.hostfile import HostFile, aligned_buffer, pwrite_all, refuse_special
from qcowlib.errors import InvalidArgument, QcowlibIOError, UnsupportedFeature
from qcowlib.formats.opener import ChainOpener, probe_format

Progress = Callable[[int, int], None]
_T = TypeVar("_T")
_CHUNK = 4 * 1024 * 1024


def _format_of(path: str, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    host = HostFile(path)
    try:
        return probe_format(host)
    finally:
        host.close()


def resize(path: str, size_text: str, *, fmt: str | None = None, shrink: bool = False) -> int:
    """``qemu-img resize``: ``size_text`` is ``SIZE``, ``+SIZE`` or ``-SIZE``.

    Returns the new virtual size.  Shrinking needs ``shrink``, as in qemu-img.
    """
    from qcowlib._units import parse_size
    from qcowlib.formats import registry

    relative = size_text[:1] if size_text[:1] in "+-" else ""
    amount = parse_size(size_text[1:] if relative else size_text)
    fmt = _format_of(path, fmt)
    entry = registry.by_name(fmt)
    if entry.resize is None:
        raise UnsupportedFeature(f"resizing {fmt} images is not supported yet")

    def new_size(current: int) -> int:
        return _new_size(current, amount, relative)

    with interrupt.deferred():  # in place: a signal waits until the change is whole
        result: int = entry.implementation("resize")(path, new_size, shrink=shrink)
    return result


def _new_size(current: int, amount: int, relative: str) -> int:
    new = current + amount if relative == "+" else current - amount if relative else amount
    if new < 0:
        raise InvalidArgument("New image size must be positive")
    return new


def rebase(
    path: str,
    backing: str,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
    progress: Progress | None = None,
    backing_policy: BackingPolicy | str | None = None,
) -> None:
    """``qemu-img rebase``: point ``path`` at a new backing file (``""``: none).

    Safe mode first copies into the image every range where the old backing chain
    and the new backing file differ, so the guest content does not change.  A backing
    format is required for a non-empty backing name (never guessed).  The old chain
    and the new backing file are read as ``backing_policy`` allows (``follow``,
    ``contained``; ``none`` reads neither, so only ``unsafe`` works with it).
    """
    from qcowlib.formats.opener import open_rw

    if backing and not backing_fmt:
        raise InvalidArgument("-b needs -F: a backing format is never guessed")
    policy = as_policy(backing_policy).rooted(path)
    if not unsafe and not policy.follow:
        raise InvalidArgument(
            "a safe rebase reads the old and new backing files: backing policy 'none' "
            "allows only -u"
        )
    # In place, no temporary file: a signal is acted on between chunks of the copy
    # (the guest content is unchanged at every such point) or after the header change.
    with interrupt.deferred(), open_rw(path, follow_backing=not unsafe, policy=policy) as disk:
        if not unsafe:
            new_base: Disk | None = None
            if backing:
                full = resolve_linked_path(path, backing, "backing file", policy)
                new_base = ChainOpener(policy)(full, backing_fmt)
            try:
                _copy_differences(disk, new_base, progress)
            finally:
                if new_base is not None:
                    new_base.close()
        disk.set_backing(backing or None, backing_fmt if backing else None)


def _copy_differences(disk: Disk, new_base: Disk | None, progress: Progress | None) -> None:
    """Write into ``disk`` what its old backing shows where the new one differs.

    Only ranges this image leaves to its backing, and where either backing may hold
    data (by their extent maps), are read; differing clusters are written in runs.
    """
    from qcowlib.core.plan import candidate_units, merge_ranges
    from qcowlib.formats.qcow2.writer import Qcow2RWDisk

    assert isinstance(disk, Qcow2RWDisk)
    size = disk.virtual_size
    old_base = disk.backing
    cs = disk.cluster_size
    maybe = merge_ranges(candidate_units(old_base, cs), candidate_units(new_base, cs))
    own = [(e.start, e.end) for e in disk.layer_extents() if e.kind is ExtentKind.UNALLOCATED]
    old_buf, new_buf = aligned_buffer(_CHUNK), aligned_buffer(_CHUNK)
    for start, end in _intersect(own, [(a * cs, min(b * cs, size)) for a, b in maybe]):
        pos = start
        while pos < end:
            n = min(_CHUNK, end - pos)
            old, new = old_buf[:n], new_buf[:n]
            _read_or_zero(old_base, pos, old)
            _read_or_zero(new_base, pos, new)
            for first, last in _runs(_differing_clusters(old, new, cs)):
                disk.write(pos + first * cs, old[first * cs : min(n, last * cs)])
            interrupt.checkpoint()
            pos += n
            if progress:
                progress(pos, size)
    if old_base is not None:
        old_base.close()
    disk.backing = None


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges covered by both sorted, non-overlapping lists of ``[start, end)``."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _differing_clusters(old: memoryview, new: memoryview, cs: int) -> np.ndarray:
    """One flag per ``cs`` bytes (the last part may be short): True where they differ."""
    n = len(old)
    unit = 8 if n % 8 == 0 else 1
    dtype = np.uint64 if unit == 8 else np.uint8
    diff = np.frombuffer(old, dtype=dtype) != np.frombuffer(new, dtype=dtype)
    nclus = -(-n // cs)
    padded = np.zeros(nclus * cs // unit, dtype=bool)
    padded[: diff.size] = diff
    return np.asarray(padded.reshape(nclus, cs // unit).any(axis=1))


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``[first, last)`` index runs where ``flags`` is set."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _read_or_zero(disk: Disk | None, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` with ``disk``'s bytes from ``offset``; zeros past its end or without it."""
    m = 0
    if disk is not None and offset < disk.virtual_size:
        m = min(len(buf), disk.virtual_size - offset)
        disk.read_into(offset, buf[:m])
    if m < len(buf):
        buf[m:] = bytes(len(buf) - m)


def commit(
    path: str,
    *,
    drop: bool = False,
    progress: Progress | None = None,
    backing_policy: BackingPolicy | str | None = None,
) -> None:
    """``qemu-img commit``: write the image's own data into its backing file, then
    empty the image unless ``drop`` (``-d``) is given.  The backing file must be one
    ``backing_policy`` allows (``none`` refuses every commit)."""
    from qcowlib.formats import registry
    from qcowlib.formats.opener import backing_format, backing_name, open_rw

    # In place: a signal is acted on between chunks (the top image still holds all its
    # data then, so the guest sees the same disk), never inside a metadata update.
    with interrupt.deferred(), open_rw(path, follow_backing=False) as top:
        name = backing_name(top)
        if name is None:
            raise InvalidArgument("Image does not have a backing file")
        policy = as_policy(backing_policy).rooted(path)
        if not policy.follow:
            raise InvalidArgument("commit writes into the backing file: backing policy 'none'")
        full = resolve_linked_path(path, name, "backing file", policy)
        bfmt = backing_format(top)
        if bfmt is None:
            # Never write into a file whose format was guessed (a guest could have made
            # a raw file look like anything): the format must be recorded.
            raise InvalidArgument(
                f"{path} does not record its backing file's format; "
                "record it first with: qcowlib rebase -u -b NAME -F FMT"
            )
        entry = registry.by_name(bfmt)
        if entry.writer is None:
            raise UnsupportedFeature(f"committing into a {bfmt} backing file is not supported yet")
        refuse_special(full)  # never write into a device or /proc file an image names
        base: Writer = entry.implementation("writer")(full)
        try:
            _copy_layer_into(top, base, progress)
        finally:
            base.close()
        if not drop:
            top.make_empty()


def _copy_layer_into(top: Disk, base: Writer, progress: Progress | None) -> None:
    """Write what ``top`` itself holds (data and zeros) into ``base``, then flush it."""
    if base.virtual_size < top.virtual_size:
        base.resize(top.virtual_size)
    buf = aligned_buffer(_CHUNK)
    for ext in list(top.layer_extents()):
        if ext.kind is ExtentKind.UNALLOCATED:
            continue
        pos = ext.start
        while pos < ext.end:
            n = min(_CHUNK, ext.end - pos)
            if ext.kind is ExtentKind.ZERO:
                base.write_zeroes(pos, n)
            else:
                view = buf[:n]
                top.read_into(pos, view)
                base.write(pos, view)
            interrupt.checkpoint()
            pos += n
            if progress:
                progress(pos, top.virtual_size)
    base.flush()


def _os_call(func: Callable[..., _T], *args: object) -> _T:
    """Call an ``os`` function; its OSError becomes a QcowlibIOError."""
    try:
        return func(*args)
    except OSError as exc:
        raise QcowlibIOError(f"{func.__name__} failed: {exc.strerror}") from None


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    pwrite_all(fd, data, offset)
