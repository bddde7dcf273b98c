"""VDI output: ``-o static=on|off``, written or streamed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from qcowlib._units import parse_option_bool
from qcowlib.core.drivers import OutputRequest, Progress, no_backing, no_compress, no_more_options

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.core.emit import HashSink, LayoutStream


def vdi_static(request: OutputRequest) -> bool:
    """Checked ``-o`` options of a VDI output: whether it is static."""
    no_compress(request)
    opts = dict(request.options)
    static = parse_option_bool("static", opts.pop("static", "off"))
    no_more_options(opts)
    return static


class _Vdi:
    name: Final = "vdi"

    def check(self, request: OutputRequest) -> None:
        no_backing(request, "vdi")
        vdi_static(request)

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
        from qcowlib.formats.vdi.output import VdiLayout

        layout = VdiLayout(disk, static=vdi_static(request))
        return write_image(layout, dst, protect=protect, progress=progress, hashers=hashers)

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> LayoutStream:
        from qcowlib.core.emit import LayoutStream
        from qcowlib.formats.vdi.output import VdiLayout

        return LayoutStream(VdiLayout(disk, static=vdi_static(request)), chunk_size=chunk_size)


VDI: Final = _Vdi()
