"""Opening images through the registry, and following their backing chains safely.

Each layer is opened by its format's reader (:mod:`qcowlib.formats.registry`); backing
and external data file names are untrusted and resolved by :mod:`qcowlib.core.chain`
(relative to the image's directory, protocols refused, the caller's
:class:`~qcowlib.core.chain.BackingPolicy` deciding about absolute and escaping paths);
loops are detected by file identity and depth is capped.  This sits above the readers:
a reader reports the names, the chain is opened here, as QEMU's block layer opens what
its drivers name.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from qcowlib._log import get_logger
from qcowlib.core.chain import BackingPolicy, as_policy, open_linked, resolve_linked_path
from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import HostFile
from qcowlib.core.locks import take_read_locks
from qcowlib.errors import (
    BackingFormatUnknown,
    BackingLoop,
    BackingNotFound,
    BackingTooDeep,
    FormatError,
    ImageLocked,
    InvalidArgument,
    QcowlibError,
    QcowlibIOError,
    UnsafeBackingPath,
    UnsupportedFeature,
)
from qcowlib.formats import detect, registry

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.writer import Qcow2RWDisk

log = get_logger(__name__)

__all__ = [
    "ChainOpener",
    "attach_backing_chain",
    "backing_format",
    "backing_name",
    "open_disk",
    "open_rw",
    "probe_format",
]


def probe_format(host: HostFile) -> str:
    """Probe a file's format from its content (never its name)."""
    head = host.pread(0, min(host.size, detect.PROBE_HEAD_SIZE))
    tail_len = min(host.size, detect.PROBE_TAIL_SIZE)
    tail = host.pread(host.size - tail_len, tail_len)
    return detect.probe(head, tail, host.size).format


def _open_layer(
    path: str,
    fmt: str | None,
    seen: set[tuple[int, int]],
    policy: BackingPolicy,
    *,
    linked: bool = False,
) -> tuple[Disk, HostFile]:
    """Open one image of a chain with qemu-img's read locks (``linked``: a backing file,
    which must be a regular file, inside the root under ``contained``)."""
    within = policy.root if linked and policy.contained else None
    host = HostFile(path, linked=linked, within=within)
    try:
        if host.identity in seen:
            raise BackingLoop(f"backing chain loops back to {path}", file=path)
        seen.add(host.identity)
        take_read_locks(host.fd, path, force_share=policy.force_share)
        if fmt is None:
            fmt = probe_format(host)  # an ISO 9660 image opens as raw (registry)
        disk = _make_disk(host, path, fmt, policy)
    except BaseException:
        host.close()
        raise
    return disk, host


def _make_disk(host: HostFile, path: str, fmt: str, policy: BackingPolicy) -> Disk:
    entry = registry.by_name(fmt)
    if not entry.can_read:
        raise UnsupportedFeature(f"{fmt} images are not supported yet", file=path)
    return entry.opener()(host, path, policy)


def open_disk(
    path: str,
    fmt: str | None = None,
    policy: BackingPolicy | str | None = None,
    *,
    force_share: bool = False,
) -> Disk:
    """Open an image read-only, with its backing chain as ``policy`` allows.

    ``fmt`` forces the top image's format; without it the format is probed from the
    content.  ``policy`` is a :class:`BackingPolicy` or one of its names (``follow``,
    the default, ``contained``, ``none``); ``force_share`` (qemu-img ``-U``) opens
    images that another process holds open for writing.  Raises :class:`QcowlibError`
    subclasses: :class:`ImageLocked` for an image (or backing file) another process
    has open for writing, :class:`QcowlibIOError` when a file cannot be opened,
    :class:`FormatError` and friends for bad content, :class:`BackingChainError`
    subclasses for chains that cannot be followed (naming the top image and the
    offending file).
    """
    return _open_chain(path, fmt, as_policy(policy, force_share=force_share).rooted(path))


class ChainOpener:
    """Opens a backing file that an image names, ``(path, fmt) -> Disk``, as the chain
    opener would: a regular file only, with ``policy`` (also for its own chain)."""

    def __init__(self, policy: BackingPolicy | None = None) -> None:
        self.policy = policy if policy is not None else BackingPolicy()

    def __call__(self, path: str, fmt: str | None) -> Disk:
        return _open_chain(path, fmt, self.policy, linked=True)


def _open_chain(path: str, fmt: str | None, policy: BackingPolicy, *, linked: bool = False) -> Disk:
    if fmt is not None and fmt not in registry.known():
        raise InvalidArgument(f"unknown format {fmt!r}")
    seen: set[tuple[int, int]] = set()
    top, _ = _open_layer(path, fmt, seen, policy, linked=linked)
    try:
        attach_backing_chain(top, policy, seen)
    except BaseException:
        top.close()
        raise
    return top


def attach_backing_chain(
    top: Disk, policy: BackingPolicy, seen: set[tuple[int, int]] | None = None
) -> None:
    """Open and attach ``top``'s backing files (and data files) as ``policy`` allows.

    The chain is opened in a loop (no recursion), up to ``policy.max_depth`` images;
    every error names ``top`` and the image at fault.
    """
    policy = policy.rooted(top.filename)
    if seen is None:
        seen = set()
        host = getattr(top, "host", None)
        if isinstance(host, HostFile):
            seen.add(host.identity)
    current = top
    depth = 1
    while True:
        try:
            _attach_data_file(current, policy)
        except QcowlibError as exc:
            raise _blame(exc, top, current) from None
        name = backing_name(current)
        if name is None or not policy.follow:
            break
        if depth >= policy.max_depth:
            raise BackingTooDeep(
                f"backing chain is deeper than {policy.max_depth} images "
                f"(reached {current.filename!r})",
                file=top.filename,
            )
        layer = _open_backing(top, current, name, policy, seen)
        try:
            current.check_parent(layer)
        except BaseException:
            layer.close()
            raise
        current.backing = layer
        current = layer
        depth += 1


def _of(top: Disk, current: Disk) -> str:
    """`` of 'mid.qcow2'`` when the naming image is not the top one."""
    return "" if current is top else f" of {current.filename!r}"


def _open_backing(
    top: Disk, current: Disk, name: str, policy: BackingPolicy, seen: set[tuple[int, int]]
) -> Disk:
    """Open ``current``'s backing file ``name``; errors name ``top`` and the file."""
    where = _of(top, current)
    try:
        full = resolve_linked_path(current.filename, name, "backing file", policy)
    except UnsafeBackingPath as exc:
        raise UnsafeBackingPath(f"{exc.message}{where}", file=top.filename) from None
    bfmt = backing_format(current)
    if bfmt is None and not policy.probe_format:
        raise BackingFormatUnknown(
            f"backing file {name!r}{where} has no recorded format, and backing policy "
            f"{policy.name!r} never probes one",
            file=top.filename,
        )
    if not os.path.lexists(full):
        raise BackingNotFound(
            f"backing file {name!r}{where} (looked for {full!r}) does not exist",
            file=top.filename,
        )
    try:
        layer, _ = _open_layer(full, bfmt, seen, policy, linked=True)
    except BackingLoop as exc:
        raise BackingLoop(f"{exc.message}{where}", file=top.filename) from None
    except ImageLocked as exc:
        raise ImageLocked(
            f"could not open backing file {full!r}{where}: {exc.message}", file=top.filename
        ) from None
    except QcowlibIOError as exc:
        raise BackingNotFound(
            f"cannot open backing file {full!r}{where}: {exc.message}", file=top.filename
        ) from None
    except FormatError as exc:
        if exc.file is None:
            exc.file = full
        exc.message = f"backing file of {top.filename!r}: {exc.message}"
        raise exc from None
    except QcowlibError as exc:
        if exc.file is not None and exc.file != top.filename:
            exc.message = f"backing file {exc.file!r} of {top.filename!r}: {exc.message}"
            exc.file = top.filename
        raise exc.with_file(top.filename) from None
    return layer


def _blame(exc: QcowlibError, top: Disk, current: Disk) -> QcowlibError:
    """``exc``, raised about ``current`` (a layer below ``top``), made to name ``top``."""
    if current is not top:
        exc.message = f"in backing file {current.filename!r}: {exc.message}"
        exc.file = top.filename
    return exc


def backing_name(disk: Disk) -> str | None:
    """The backing file name recorded in an image, if any (a VMDK delta disk's parent)."""
    return disk.backing_file_name


def backing_format(disk: Disk) -> str | None:
    """The backing format recorded in an image, if any, refused when no format has it."""
    fmt = disk.backing_file_format
    if fmt is not None and fmt not in registry.known():
        raise BackingFormatUnknown(
            f"unknown backing format {fmt!r}", file=disk.filename, structure="header"
        )
    return fmt


def _attach_data_file(disk: Disk, policy: BackingPolicy) -> None:
    name = disk.data_file_name
    if name is None:
        return
    if not policy.follow_data_file:
        raise UnsafeBackingPath(
            f"image uses external data file {name!r}, which this policy does not follow",
            file=disk.filename,
        )
    data, full = open_linked(disk.filename, name, "external data file", policy)
    disk.attach_data_file(data, full)


def open_rw(
    path: str, *, follow_backing: bool = True, policy: BackingPolicy | str | None = None
) -> Qcow2RWDisk:
    """Open a qcow2 image for writing, with its backing chain opened read-only.

    Raises :class:`~qcowlib.errors.ImageLocked` when another process has it open for
    writing, :class:`~qcowlib.errors.CorruptImage` for images marked corrupt or dirty,
    and the usual open errors.  ``policy`` decides what of the chain may be followed
    (backing files get qemu's shared read locks, as under a QEMU writer).
    """
    from qcowlib.formats.qcow2.writer import open_rw_layer

    disk = open_rw_layer(path)
    if follow_backing:
        try:
            attach_backing_chain(disk, as_policy(policy))
        except BaseException:
            disk.close()
            raise
    return disk
