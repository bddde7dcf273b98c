"""qcow2 output: ``convert -O qcow2`` (with ``-B`` overlays), ``flatten`` and its stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import OutputRequest, Progress
from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.qcow2.layout import CreateOptions
    from qcowlib.formats.qcow2.stream import Qcow2Serializer


class _Qcow2:
    name: Final = "qcow2"
    sparse: Final = False

    def check(self, request: OutputRequest) -> None:
        opts = request.options
        if request.standalone:
            for key in ("backing_file", "backing_fmt"):
                if opts.get(key):
                    raise InvalidArgument(f"flatten output has no backing file ({key} given)")

    def _flat_options(self, disk: Disk, request: OutputRequest) -> CreateOptions:
        """Options of a standalone image: no backing, nothing Glance refuses."""
        from qcowlib.formats.qcow2.layout import parse_options

        self.check(request)
        opts = parse_options(disk.virtual_size, dict(request.options))
        if opts.extended_l2:
            raise InvalidArgument(
                "flatten does not write extended L2 entries: Glance's image inspector refuses them"
            )
        if opts.preallocation != "off":
            raise InvalidArgument("flatten does not preallocate")
        return opts

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> None:
        from qcowlib.core.chain import BackingPolicy, resolve_linked_path
        from qcowlib.core.sinks import atomic_output
        from qcowlib.formats.qcow2.layout import parse_options
        from qcowlib.formats.qcow2.output import write_qcow2

        opts_in = dict(request.options)
        if request.backing is not None:
            opts_in["backing_file"] = request.backing
        if request.backing_format is not None:
            opts_in["backing_fmt"] = request.backing_format
        if opts_in.get("backing_file") and not opts_in.get("backing_fmt"):
            raise InvalidArgument("-B needs the backing format (-F): it is never guessed")
        opts = parse_options(disk.virtual_size, opts_in)
        if opts.preallocation != "off":
            raise InvalidArgument("convert does not support preallocation (create, then write)")
        base: Disk | None = None
        if opts.backing_file:
            if request.open_backing is None:
                raise InvalidArgument("this writer cannot open a backing file here")
            full = resolve_linked_path(dst, opts.backing_file, "backing file", BackingPolicy())
            base = request.open_backing(full, opts.backing_fmt)
        if base is not None:
            protect = protect + tuple(d.filename for d in base.chain)
        try:
            with atomic_output(dst, protect=protect) as fd:
                write_qcow2(
                    disk,
                    fd,
                    opts,
                    compress=request.compress,
                    sparse_size=request.sparse_size,
                    backing=base,
                    progress=progress,
                )
        finally:
            if base is not None:
                base.close()

    def flatten_file(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> int:
        # One read pass (and one compression of each cluster): the one-pass writer lays
        # the image out exactly as the stream does, so the file holds the stream's bytes.
        from qcowlib.core.sinks import atomic_output
        from qcowlib.formats.qcow2.output import write_qcow2

        opts = self._flat_options(disk, request)
        with atomic_output(dst, protect=protect) as fd:
            return write_qcow2(disk, fd, opts, compress=request.compress, progress=progress)

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Qcow2Serializer:
        from qcowlib.formats.qcow2.stream import Qcow2Serializer

        opts = self._flat_options(disk, request)
        return Qcow2Serializer(disk, opts, compress=request.compress, chunk_size=chunk_size)


QCOW2: Final = _Qcow2()
