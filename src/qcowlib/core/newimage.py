"""``create`` for formats whose writer makes new images: an empty image is the writer's
output for a source with no data (:class:`qcowlib.core.disk.EmptyDisk`), so each format
has one writer, and ``create`` only parses its options.

The helpers here give every such format qemu-img create's handling of the size, of a
backing file it cannot have, and its "Formatting ..." line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from qcowlib.errors import InvalidArgument

__all__ = ["Created", "formatting_line", "take_size"]


class Created(NamedTuple):
    """What a format's ``create`` made: the virtual size and qemu-img's line for it."""

    size: int
    line: str


def take_size(
    fmt: str,
    size: int | None,
    options: Mapping[str, str],
    backing: str | None,
    backing_fmt: str | None,
) -> tuple[int, dict[str, str]]:
    """The size of a new image without a backing file, and the ``-o`` options left.

    Raises :class:`InvalidArgument` as qemu-img does: a backing file the format cannot
    have, a size given twice or not at all.
    """
    from qcowlib._units import parse_option_size

    opts = dict(options)
    if backing or backing_fmt or opts.get("backing_file") or opts.get("backing_fmt"):
        raise InvalidArgument(f"Backing file not supported for file format '{fmt}'")
    if "size" in opts:
        if size is not None:
            raise InvalidArgument("The image size must be specified only once")
        size = parse_option_size("size", opts.pop("size"))
    if size is None:
        raise InvalidArgument("Image creation needs a size parameter")
    if size < 0:
        raise InvalidArgument("Image size must be a non-negative number")
    return size, opts


def formatting_line(
    path: str,
    fmt: str,
    size: int,
    given: Mapping[str, str],
    order: Sequence[tuple[str, str | None]],
) -> str:
    """qemu-img create's "Formatting ..." line: ``size`` then, in the format's option
    order, each option given or with a default qemu prints (``(name, default)``; a
    None default is printed only when given)."""
    parts = [f"Formatting '{path}', fmt={fmt} size={size}"]
    for name, default in order:
        value = given.get(name, default)
        if value is not None:
            parts.append(f"{name}={value}")
    return " ".join(parts)
