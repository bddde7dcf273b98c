"""VHD (``vpc``) output: ``-o subformat=dynamic|fixed,force_size=on|off``, written or
streamed, and ``create`` (the same writer's image of an empty disk)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import OutputRequest, SubformatDriver
from qcowlib.core.newimage import Created

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.vhd.output import VhdLayout


def _force_size(own: Mapping[str, str]) -> bool | None:
    """``-o force_size``: None (not given) lets the writer keep any size exactly."""
    from qcowlib._units import parse_option_bool

    value = own.get("force_size")
    return None if value is None else parse_option_bool("force_size", value)


def _layout(disk: Disk, subformat: str, own: dict[str, str]) -> VhdLayout:
    from qcowlib.formats.vhd.output import VhdLayout

    force = _force_size(own)
    return VhdLayout(disk, subformat=subformat, force_size=None if not force else True)


VPC: Final = SubformatDriver("vpc", _layout, extra=("force_size",))


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
    """A new empty VHD as ``qemu-img create -f vpc``: without ``force_size=on`` the size
    becomes the smallest CHS geometry's that covers it."""
    from qcowlib.core.disk import EmptyDisk
    from qcowlib.core.emit import write_image
    from qcowlib.core.newimage import formatting_line, take_size
    from qcowlib.errors import InvalidArgument, QcowlibError
    from qcowlib.formats.vhd import codec as vhd
    from qcowlib.formats.vhd.output import VhdLayout

    requested, opts = take_size("vpc", size, options, backing, backing_fmt)
    size = requested
    request = OutputRequest(opts)
    subformat, own = VPC.parse(request)
    force = bool(_force_size(own))
    if not force:
        try:
            size = vhd.create_geometry(size)[3] * vhd.SECTOR
        except QcowlibError as exc:
            raise InvalidArgument(f"cannot create a VHD of {size} bytes: {exc.message}") from None
    shown = {k: v for k, v in opts.items() if k in ("subformat", "force_size")}
    if "force_size" in shown:
        shown["force_size"] = "on" if force else "off"
    disk = EmptyDisk(size)
    write_image(VhdLayout(disk, subformat=subformat, force_size=force, first_block=True), path)
    order = [("subformat", None), ("force_size", None)]
    return Created(size, formatting_line(path, "vpc", requested, shown, order))
