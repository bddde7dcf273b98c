"""raw output: ``convert -O raw`` (sparse) and the raw stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import OutputRequest, Progress, no_backing, no_compress, no_more_options
from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.qcow2.stream import RawSerializer


class _Raw:
    name: Final = "raw"
    sparse: Final = True

    def check(self, request: OutputRequest) -> None:
        if request.compress or request.options:
            if request.standalone:
                raise InvalidArgument("raw output takes no options and no compression")
            no_compress(request)
        no_backing(request, "raw")
        no_more_options(dict(request.options))

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> None:
        from qcowlib.core.copy import write_raw
        from qcowlib.core.sinks import atomic_output

        with atomic_output(dst, protect=protect) as fd:
            write_raw(disk, fd, sparse_size=request.sparse_size, progress=progress)

    def flatten_file(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> int:
        self.convert(disk, dst, request, progress, protect)
        return disk.virtual_size

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> RawSerializer:
        from qcowlib.formats.qcow2.stream import RawSerializer

        return RawSerializer(disk, chunk_size=chunk_size)


RAW: Final = _Raw()
