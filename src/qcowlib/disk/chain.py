"""Opening images and following their backing chains safely.

Backing (and external data file) names are untrusted: they are resolved relative to the
image's directory as qemu-img does, protocol names (``nbd:``, ``json:``) are refused,
loops are detected by file identity, depth is capped, and the caller's
:class:`BackingPolicy` decides about absolute paths and paths that escape the image's
directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from qcowlib.disk._file import HostFile
from qcowlib.disk.base import Disk
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

#: Default cap on the number of images in a chain (top included).  Deeper chains are
#: refused so that a crafted set of files cannot make opening unbounded.
MAX_CHAIN_DEPTH = 64
_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class BackingPolicy:
    """What opening may follow.  The defaults behave like qemu-img."""

    #: Open backing files at all (False: the top image only, reads of unallocated
    #: ranges return zeros and ``backing`` is None).
    follow: bool = True
    #: Open an external data file named by the image.
    follow_data_file: bool = True
    #: Accept absolute backing/data-file paths.
    allow_absolute: bool = True
    #: Accept relative paths that leave the image's directory (``../``).
    allow_escape: bool = True
    #: Probe the backing format when the image does not record it.
    probe_format: bool = True
    max_depth: int = MAX_CHAIN_DEPTH


SAFE = BackingPolicy(allow_absolute=False, allow_escape=False, probe_format=False)


def probe_format(host: HostFile) -> str:
    """Probe a file's format from its content (never its name)."""
    head = host.pread(0, min(host.size, detect.PROBE_HEAD_SIZE))
    tail_len = min(host.size, detect.PROBE_TAIL_SIZE)
    tail = host.pread(host.size - tail_len, tail_len)
    return detect.probe(head, tail, host.size).format


def resolve_linked_path(image: str, name: str, what: str, policy: BackingPolicy) -> str:
    """The path of a file named inside ``image`` (a backing or data file), checked.

    Relative names are joined to the image's directory without normalisation, as
    qemu-img shows them (``full-backing-filename``).
    """
    if not name:
        raise UnsafeBackingPath(f"{what} name is empty", file=image)
    if "\0" in name:
        raise UnsafeBackingPath(f"{what} name contains a NUL byte", file=image)
    if _PROTOCOL_RE.match(name) and not os.path.isabs(name):
        raise UnsafeBackingPath(
            f"{what} {name!r} uses a protocol; only plain file paths are supported", file=image
        )
    if os.path.isabs(name):
        if not policy.allow_absolute:
            raise UnsafeBackingPath(f"{what} {name!r} is an absolute path", file=image)
        return name
    if not policy.allow_escape:
        norm = os.path.normpath(name)
        if norm == ".." or norm.startswith(".." + os.sep):
            raise UnsafeBackingPath(f"{what} {name!r} leaves the image's directory", file=image)
    directory = os.path.dirname(image)
    return os.path.join(directory, name) if directory else name


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


def open_disk(path: str, fmt: str | None = None, policy: BackingPolicy | None = None) -> Disk:
    """Open an image read-only, with its backing chain as ``policy`` allows.

    ``fmt`` forces the top image's format; without it the format is probed from the
    content.  Raises :class:`QcowlibError` subclasses: :class:`QcowlibIOError` when a
    file cannot be opened, :class:`FormatError` and friends for bad content,
    :class:`BackingChainError` subclasses for chains that cannot be followed.
    """
    policy = policy or BackingPolicy()
    if fmt is not None and fmt not in registry.known():
        raise InvalidArgument(f"unknown format {fmt!r}")
    seen: set[tuple[int, int]] = set()
    top, _ = _open_layer(path, fmt, seen, policy)
    try:
        _attach_backing_chain(top, policy, seen)
    except BaseException:
        top.close()
        raise
    return top


def _attach_backing_chain(
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
