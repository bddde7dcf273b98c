"""VMDK output: monolithicSparse or streamOptimized, written or streamed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import OutputRequest, Progress, no_more_options
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


def vmdk_options(request: OutputRequest) -> VmdkOptions:
    """Checked ``-o`` options of a VMDK output."""
    from qcowlib.formats.vmdk.output import ADAPTER_TYPES, SUBFORMATS

    opts = dict(request.options)
    subformat = opts.pop("subformat", "monolithicSparse")
    if subformat not in SUBFORMATS:
        raise InvalidArgument(f"Invalid subformat '{subformat}' (this version writes "
                              "monolithicSparse and streamOptimized)")  # fmt: skip
    if request.compress and subformat != "streamOptimized":
        raise InvalidArgument("Compression is only supported with subformat=streamOptimized")
    adapter_type = opts.pop("adapter_type", "ide")
    if adapter_type not in ADAPTER_TYPES:
        raise InvalidArgument(f"Unknown adapter type: '{adapter_type}'")
    hw_version = opts.pop("hwversion", "undefined")
    if hw_version == "undefined":
        hw_version = "4"
    elif not hw_version.isdigit() or not 1 <= int(hw_version) <= 99:
        raise InvalidArgument(f"Invalid hwversion '{hw_version}'")
    no_more_options(opts)
    return VmdkOptions(subformat, adapter_type, hw_version)


class _Vmdk:
    name: Final = "vmdk"

    def check(self, request: OutputRequest) -> None:
        if request.backing:
            raise InvalidArgument("Backing file not supported for file format 'vmdk' here")
        vmdk_options(request)

    def _layout(self, disk: Disk, request: OutputRequest, extent_name: str) -> VmdkLayout:
        from qcowlib.formats.vmdk.output import VmdkLayout

        o = vmdk_options(request)
        return VmdkLayout(
            disk,
            subformat=o.subformat,
            extent_name=extent_name,
            adapter_type=o.adapter_type,
            hw_version=o.hw_version,
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

        layout = self._layout(disk, request, os.path.basename(dst))
        return write_image(layout, dst, protect=protect, progress=progress, hashers=hashers)

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> LayoutStream:
        from qcowlib.core.emit import LayoutStream

        name = request.extent_name or os.path.splitext(os.path.basename(disk.filename))[0] + ".vmdk"
        return LayoutStream(self._layout(disk, request, name), chunk_size=chunk_size)


VMDK: Final = _Vmdk()
