"""``create``: new empty images (qcow2 with every qemu-img option, or raw)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from qcowlib.core.chain import BackingPolicy, resolve_linked_path
from qcowlib.core.sinks import atomic_output
from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError, UnsupportedFeature
from qcowlib.formats import registry
from qcowlib.formats.opener import open_disk
from qcowlib.formats.qcow2.layout import CreateOptions, parse_options
from qcowlib.formats.qcow2.output import write_qcow2


def backing_size(image: str, backing: str, backing_fmt: str) -> int:
    """The virtual size of a backing file named as it will be recorded in ``image``."""
    full = resolve_linked_path(image, backing, "backing file", BackingPolicy())
    try:
        with open_disk(full, backing_fmt) as disk:
            return disk.virtual_size
    except QcowlibError as exc:
        raise InvalidArgument(f"Could not open backing image {backing!r}: {exc}") from None


def qcow2_options(
    path: str,
    size: int | None,
    options: Mapping[str, str] | None,
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
) -> CreateOptions:
    """Resolve ``-o`` options, ``-b``/``-F`` and the size as qemu-img create does."""
    opts = dict(options or {})
    if backing is not None:
        opts["backing_file"] = backing
    if backing_fmt is not None:
        opts["backing_fmt"] = backing_fmt
    bfile = opts.get("backing_file")
    if bfile and not opts.get("backing_fmt"):
        raise InvalidArgument(
            "Backing file specified without backing format (use -F; it is never guessed)"
        )
    if size is not None and "size" in opts:
        raise InvalidArgument("The image size must be specified only once")
    if size is None and "size" not in opts:
        if not bfile or unsafe:
            raise InvalidArgument("Image creation needs a size parameter")
        size = backing_size(path, bfile, opts["backing_fmt"])
    elif bfile and not unsafe:
        backing_size(path, bfile, opts["backing_fmt"])  # must open, as qemu-img checks
    return parse_options(size or 0, opts)


def create(
    path: str,
    fmt: str = "qcow2",
    size: int | None = None,
    *,
    options: Mapping[str, str] | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
) -> CreateOptions | int:
    """Create an empty image at ``path`` (replacing any file there once complete).

    Returns the qcow2 :class:`CreateOptions` used, or the raw size.  Raises
    :class:`InvalidArgument` for qemu-img's refusals (bad sizes, options or
    combinations, a backing file without its format, a backing file that cannot be
    opened unless ``unsafe``).
    """
    entry = registry.by_name(fmt)
    if entry.create is None:
        raise UnsupportedFeature(f"creating {fmt} images is not supported yet")
    make = entry.implementation("create")
    result: CreateOptions | int = make(
        path, size, options or {}, backing, backing_fmt, unsafe=unsafe
    )
    return result


def create_raw(
    path: str,
    size: int | None,
    options: Mapping[str, str],
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
) -> int:
    """A new raw image of ``size`` bytes (``-o preallocation=off|falloc|full``)."""
    if backing or backing_fmt:
        raise InvalidArgument("raw images cannot have a backing file")
    prealloc = "off"
    for key, value in options.items():
        if key == "preallocation":
            prealloc = value
        elif key != "size":
            raise InvalidArgument(f"Invalid parameter '{key}'")
    if size is None:
        raise InvalidArgument("Image creation needs a size parameter")
    with atomic_output(path) as fd:
        try:
            os.ftruncate(fd, size)
            if prealloc == "falloc":
                os.posix_fallocate(fd, 0, size) if size else None
            elif prealloc == "full":
                zero = bytes(1 << 20)
                for pos in range(0, size, len(zero)):
                    os.pwrite(fd, zero[: min(len(zero), size - pos)], pos)
            elif prealloc != "off":
                raise InvalidArgument(f"Invalid parameter value for 'preallocation': '{prealloc}'")
        except OSError as exc:
            raise QcowlibIOError(f"cannot create {path}: {exc.strerror}", file=path) from None
    return size


def create_qcow2(
    path: str,
    size: int | None,
    options: Mapping[str, str],
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
) -> CreateOptions:
    """A new empty qcow2 image with qemu-img create's options."""
    opts = qcow2_options(path, size, options, backing, backing_fmt, unsafe=unsafe)
    with atomic_output(path) as fd:
        write_qcow2(None, fd, opts)
    return opts


def describe(path: str, fmt: str, opts: CreateOptions | int) -> str:
    """qemu-img create's "Formatting ..." line."""
    if isinstance(opts, int):
        return f"Formatting '{path}', fmt={fmt} size={opts}"
    parts = [
        f"Formatting '{path}', fmt=qcow2",
        f"cluster_size={opts.cluster_size}",
        f"extended_l2={'on' if opts.extended_l2 else 'off'}",
    ]
    if opts.preallocation != "off":
        parts.append(f"preallocation={opts.preallocation}")
    parts.append(f"compression_type={opts.compression_type}")
    parts.append(f"size={opts.virtual_size}")
    if opts.backing_file:
        parts.append(f"backing_file={opts.backing_file}")
    if opts.backing_fmt:
        parts.append(f"backing_fmt={opts.backing_fmt}")
    parts.append(f"lazy_refcounts={'on' if opts.lazy_refcounts else 'off'}")
    parts.append(f"refcount_bits={opts.refcount_bits}")
    return " ".join(parts)
