"""VDI output: ``-o static=on|off``, written or streamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from qcowlib._units import parse_option_bool
from qcowlib.core.drivers import OutputRequest, Progress, no_backing, no_compress, no_more_options

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.vdi.stream import VdiSerializer


def vdi_static(request: OutputRequest) -> bool:
    """Checked ``-o`` options of a VDI output: whether it is static."""
    no_compress(request)
    opts = dict(request.options)
    static = parse_option_bool("static", opts.pop("static", "off"))
    no_more_options(opts)
    return static


class _Vdi:
    name: Final = "vdi"
    sparse: Final = True

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
    ) -> None:
        from qcowlib.core.sinks import atomic_output
        from qcowlib.formats.vdi.output import write_vdi

        with atomic_output(dst, protect=protect) as fd:
            write_vdi(disk, fd, static=vdi_static(request), progress=progress)

    def flatten_file(self, *_: object) -> None:
        return None

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> VdiSerializer:
        from qcowlib.formats.vdi.stream import VdiSerializer

        return VdiSerializer(disk, static=vdi_static(request), chunk_size=chunk_size)


VDI: Final = _Vdi()
