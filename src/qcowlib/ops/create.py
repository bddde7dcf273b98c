"""``create``: new empty images of every format with a writer (qemu-img's options)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from qcowlib.core.newimage import Created
from qcowlib.errors import UnsupportedFeature
from qcowlib.formats import registry
from qcowlib.formats.opener import open_disk
from qcowlib.formats.qcow2.layout import CreateOptions


def create(
    path: str | os.PathLike[str],
    fmt: str = "qcow2",
    size: int | None = None,
    *,
    options: Mapping[str, str] | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
) -> CreateOptions | Created | int:
    """Create an empty image at ``path`` (replacing any file there once complete).

    Returns the qcow2 :class:`CreateOptions` used, the raw size, or for the other
    formats a :class:`Created` (size and qemu-img's "Formatting" line).  Raises
    :class:`InvalidArgument` for qemu-img's refusals (bad sizes, options or
    combinations, a backing file without its format, a backing file that cannot be
    opened unless ``unsafe``).
    """
    path = os.fspath(path)
    entry = registry.by_name(fmt)
    if entry.create is None:
        raise UnsupportedFeature(f"creating {fmt} images is not supported yet")
    make = entry.implementation("create")
    result: CreateOptions | Created | int = make(
        path, size, options or {}, backing, backing_fmt, unsafe=unsafe, open_backing=open_disk
    )
    return result


def describe(path: str, fmt: str, opts: CreateOptions | Created | int) -> str:
    """qemu-img create's "Formatting ..." line."""
    if isinstance(opts, Created):
        return opts.line
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
