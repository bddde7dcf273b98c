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

from qcowlib.core.chain import BackingPolicy, resolve_linked_path
from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import (
    BackingFormatUnknown,
    BackingLoop,
    BackingNotFound,
    BackingTooDeep,
    FormatError,
    InvalidArgument,
    QcowlibError,
    QcowlibIOError,
    UnsafeBackingPath,
    UnsupportedFeature,
)
from qcowlib.formats import detect, registry

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.writer import Qcow2RWDisk

__all__ = [
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
    path: str, fmt: str | None, seen: set[tuple[int, int]], policy: BackingPolicy
) -> tuple[Disk, HostFile]:
    host = HostFile(path)
    try:
        if host.identity in seen:
            raise BackingLoop(f"backing chain loops back to {path}", file=path)
        seen.add(host.identity)
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
    path: str | os.PathLike[str], fmt: str | None = None, policy: BackingPolicy | None = None
) -> Disk:
    """Open an image read-only, with its backing chain as ``policy`` allows.

    ``fmt`` forces the top image's format; without it the format is probed from the
    content.  Raises :class:`QcowlibError` subclasses: :class:`QcowlibIOError` when a
    file cannot be opened, :class:`FormatError` and friends for bad content,
    :class:`BackingChainError` subclasses for chains that cannot be followed.
    """
    path = os.fspath(path)
    policy = policy or BackingPolicy()
    if fmt is not None and fmt not in registry.known():
        raise InvalidArgument(f"unknown format {fmt!r}")
    seen: set[tuple[int, int]] = set()
    top, _ = _open_layer(path, fmt, seen, policy)
    try:
        attach_backing_chain(top, policy, seen)
    except BaseException:
        top.close()
        raise
    return top


def attach_backing_chain(
    top: Disk, policy: BackingPolicy, seen: set[tuple[int, int]] | None = None
) -> None:
    """Open and attach ``top``'s backing files (and data files) as ``policy`` allows."""
    if seen is None:
        seen = set()
        host = getattr(top, "host", None)
        if isinstance(host, HostFile):
            seen.add(host.identity)
    current = top
    depth = 1
    while True:
        _attach_data_file(current, policy)
        name = backing_name(current)
        if name is None or not policy.follow:
            break
        if depth >= policy.max_depth:
            raise BackingTooDeep(
                f"backing chain is deeper than {policy.max_depth} images", file=current.filename
            )
        full = resolve_linked_path(current.filename, name, "backing file", policy)
        bfmt = backing_format(current)
        if bfmt is None and not policy.probe_format:
            raise BackingFormatUnknown(
                f"backing file {name!r} has no recorded format and probing is not allowed",
                file=current.filename,
            )
        if not os.path.lexists(full):
            raise BackingNotFound(
                f"backing file {name!r} (looked for {full!r}) does not exist",
                file=current.filename,
            )
        try:
            layer, _ = _open_layer(full, bfmt, seen, policy)
        except BackingLoop:
            raise
        except QcowlibIOError as exc:
            raise BackingNotFound(
                f"cannot open backing file {full!r}: {exc.message}", file=current.filename
            ) from None
        except FormatError as exc:
            raise exc.with_file(full) from None
        try:
            current.check_parent(layer)
        except BaseException:
            layer.close()
            raise
        current.backing = layer
        current = layer
        depth += 1


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
    full = resolve_linked_path(disk.filename, name, "external data file", policy)
    try:
        data = HostFile(full)
    except QcowlibError as exc:
        raise QcowlibIOError(
            f"cannot open external data file {full!r}: {exc.message}", file=disk.filename
        ) from None
    disk.attach_data_file(data, full)


def open_rw(path: str | os.PathLike[str], *, follow_backing: bool = True) -> Qcow2RWDisk:
    """Open a qcow2 image for writing, with its backing chain opened read-only.

    Raises :class:`~qcowlib.errors.ImageLocked` when another process has it open for
    writing, :class:`~qcowlib.errors.CorruptImage` for images marked corrupt or dirty,
    and the usual open errors.
    """
    path = os.fspath(path)
    from qcowlib.formats.qcow2.writer import open_rw_layer

    disk = open_rw_layer(path)
    if follow_backing:
        try:
            attach_backing_chain(disk, BackingPolicy())
        except BaseException:
            disk.close()
            raise
    return disk
