"""VMDK output: monolithicSparse or streamOptimized, written or streamed."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qcowlib._units import parse_option_bool
from qcowlib.core.drivers import OutputRequest, Progress, no_more_options
from qcowlib.core.newimage import Created
from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.core.emit import HashSink, LayoutStream
    from qcowlib.formats.vmdk.output import VmdkLayout


@dataclass(frozen=True)
class VmdkOptions:
    subformat: str
    adapter_type: str
    hw_version: str
    zeroed_grain: bool = False
    tools_version: str = "2147483647"


def vmdk_options(request: OutputRequest) -> VmdkOptions:
    """Checked ``-o`` options of a VMDK output (qemu-img's names and refusals)."""
    from qcowlib.formats.vmdk.output import ADAPTER_TYPES, SUBFORMATS, TOOLS_VERSION
    from qcowlib.formats.vmdk.split import SPLIT_SUBFORMATS

    opts = dict(request.options)
    subformat = opts.pop("subformat", "monolithicSparse")
    if subformat not in SUBFORMATS + SPLIT_SUBFORMATS:
        raise InvalidArgument(f"Unknown subformat: {subformat}")
    if request.compress and subformat != "streamOptimized":
        raise InvalidArgument("Compression is only supported with subformat=streamOptimized")
    adapter_type = opts.pop("adapter_type", "ide")
    if adapter_type not in ADAPTER_TYPES:
        raise InvalidArgument(f"Unknown adapter type: '{adapter_type}'")
    compat6 = parse_option_bool("compat6", opts.pop("compat6", "off"))
    hw_version = opts.pop("hwversion", "undefined")
    if compat6 and hw_version != "undefined":
        raise InvalidArgument("compat6 cannot be enabled with hwversion set")
    if hw_version == "undefined":
        hw_version = "6" if compat6 else "4"
    elif not hw_version.isdigit() or not 1 <= int(hw_version) <= 99:
        raise InvalidArgument(f"Invalid hwversion '{hw_version}'")
    zeroed = parse_option_bool("zeroed_grain", opts.pop("zeroed_grain", "off"))
    tools = opts.pop("toolsversion", TOOLS_VERSION)
    if not tools.isdigit():
        raise InvalidArgument(f"Invalid toolsversion '{tools}'")
    no_more_options(opts)
    return VmdkOptions(subformat, adapter_type, hw_version, zeroed, tools)


class _Vmdk:
    name: Final = "vmdk"

    def check(self, request: OutputRequest) -> None:
        if request.backing:
            raise InvalidArgument("Backing file not supported for file format 'vmdk' here")
        vmdk_options(request)

    def layout(self, disk: Disk, request: OutputRequest, extent_name: str) -> VmdkLayout:
        from qcowlib.formats.vmdk.output import VmdkLayout

        o = vmdk_options(request)
        return VmdkLayout(
            disk,
            subformat=o.subformat,
            extent_name=extent_name,
            adapter_type=o.adapter_type,
            hw_version=o.hw_version,
            zeroed_grain=o.zeroed_grain,
            tools_version=o.tools_version,
        )

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
        hashers: Sequence[HashSink] = (),
    ) -> int:
        from qcowlib.core.emit import write_image

        o = vmdk_options(request)
        if o.subformat in _split():
            from qcowlib.formats.vmdk.split import write_split

            if hashers:
                raise InvalidArgument(f"a {o.subformat} VMDK is several files: no one checksum")
            return write_split(
                disk, dst, o, sparse_size=request.sparse_size, protect=protect, progress=progress
            )
        layout = self.layout(disk, request, os.path.basename(dst))
        return write_image(layout, dst, protect=protect, progress=progress, hashers=hashers)

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> LayoutStream:
        from qcowlib.core.emit import LayoutStream

        subformat = vmdk_options(request).subformat
        if subformat in _split():
            raise InvalidArgument(f"a {subformat} VMDK is several files: it cannot be streamed")

        name = request.extent_name or os.path.splitext(os.path.basename(disk.filename))[0] + ".vmdk"
        return LayoutStream(self.layout(disk, request, name), chunk_size=chunk_size)


VMDK: Final = _Vmdk()


def _split() -> tuple[str, ...]:
    from qcowlib.formats.vmdk.split import SPLIT_SUBFORMATS

    return SPLIT_SUBFORMATS


# -- new empty images (the registry's create) ----------------------------------------
#: qemu-img create's order of VMDK options in its "Formatting" line, with the defaults
#: it prints.
_SHOWN: Final = (
    ("adapter_type", None),
    ("compat6", "off"),
    ("hwversion", "undefined"),
    ("toolsversion", None),
    ("subformat", None),
    ("zeroed_grain", None),
)


def create(
    path: str,
    size: int | None,
    options: Mapping[str, str],
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
    open_backing: Callable[[str, str | None], Disk] | None = None,  # no delta disks yet
) -> Created:
    """A new empty VMDK as ``qemu-img create -f vmdk``: the writer's image of an empty
    disk, whose descriptor names the file itself."""
    from qcowlib.core.disk import EmptyDisk
    from qcowlib.core.emit import write_image
    from qcowlib.core.newimage import formatting_line, take_size

    size, opts = take_size("vmdk", size, options, backing, backing_fmt)
    request = OutputRequest(opts)
    o = vmdk_options(request)
    if o.subformat in _split():
        from qcowlib.formats.vmdk.split import write_split

        write_split(EmptyDisk(size), path, o)
    else:
        write_image(VMDK.layout(EmptyDisk(size), request, os.path.basename(path)), path)
    shown = dict(opts)
    for key in ("compat6", "zeroed_grain"):
        if key in shown:
            shown[key] = "on" if parse_option_bool(key, shown[key]) else "off"
    return Created(size, formatting_line(path, "vmdk", size, shown, _SHOWN))
