"""VHDX output: ``-o subformat=dynamic|fixed,block_size=N,log_size=N,block_state_zero=on|off``,
written or streamed, and ``create`` (the same writer's image of an empty disk)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib.core.drivers import OutputRequest, SubformatDriver
from qcowlib.core.newimage import Created

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.vhdx.output import VhdxLayout

_OWN: Final = ("block_size", "log_size", "block_state_zero")


class VhdxOptions(NamedTuple):
    block_size: int
    log_size: int
    block_state_zero: bool


def vhdx_options(own: Mapping[str, str], *, zero_default: bool) -> VhdxOptions:
    """The VHDX writer's own ``-o`` options, checked as qemu-img checks them.

    ``block_state_zero`` defaults to ``zero_default``: on for ``create`` (as qemu-img),
    off for ``convert`` (blocks left ``NOT_PRESENT``, as Hyper-V writes them).
    """
    from qcowlib._units import parse_option_bool, parse_option_size
    from qcowlib.formats.vhdx.output import LOG_SIZE, check_sizes

    block = parse_option_size("block_size", own["block_size"]) if "block_size" in own else 0
    log = parse_option_size("log_size", own["log_size"]) if "log_size" in own else LOG_SIZE
    zero = zero_default
    if "block_state_zero" in own:
        zero = parse_option_bool("block_state_zero", own["block_state_zero"])
    check_sizes(block, log)
    return VhdxOptions(block, log, zero)  # rounded as QEMU rounds them by the layout


def _layout(
    disk: Disk, subformat: str, own: dict[str, str], *, zero_default: bool = False
) -> VhdxLayout:
    from qcowlib.formats.vhdx.output import VhdxLayout

    o = vhdx_options(own, zero_default=zero_default)
    return VhdxLayout(
        disk,
        subformat=subformat,
        block_size=o.block_size,
        log_size=o.log_size,
        block_state_zero=o.block_state_zero,
    )


VHDX: Final = SubformatDriver("vhdx", _layout, extra=_OWN)


def create(
    path: str,
    size: int | None,
    options: Mapping[str, str],
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
    open_backing: Callable[[str, str | None], Disk] | None = None,  # no backing here
) -> Created:
    """A new empty VHDX as ``qemu-img create -f vhdx`` (``block_state_zero`` on unless
    given off: absent blocks of a dynamic image are ``ZERO`` blocks)."""
    from qcowlib.core.disk import EmptyDisk
    from qcowlib.core.emit import write_image
    from qcowlib.core.newimage import formatting_line, take_size

    size, opts = take_size("vhdx", size, options, backing, backing_fmt)
    subformat, own = VHDX.parse(OutputRequest(opts))
    layout = _layout(EmptyDisk(size), subformat, own, zero_default=True)
    write_image(layout, path)
    o = vhdx_options(own, zero_default=True)  # as given (the layout rounds them)
    shown = {"log_size": str(o.log_size), "block_size": str(o.block_size)}
    if "subformat" in opts:
        shown["subformat"] = subformat
    if "block_state_zero" in own:
        shown["block_state_zero"] = "on" if o.block_state_zero else "off"
    order = [("log_size", None), ("block_size", None), ("subformat", None)]
    order.append(("block_state_zero", None))
    return Created(size, formatting_line(path, "vhdx", size, shown, order))
