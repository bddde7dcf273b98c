"""qcow2 output: ``convert -O qcow2`` (with ``-B`` overlays), ``flatten`` and its stream."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from qcowlib.core.chain import BackingPolicy, resolve_linked_path
from qcowlib.core.drivers import OutputRequest, Progress
from qcowlib.errors import InvalidArgument, QcowlibError

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.core.emit import HashSink, LayoutStream
    from qcowlib.formats.qcow2.layout import CreateOptions


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
        hashers: Sequence[HashSink] = (),
    ) -> int:
        from qcowlib.core.emit import write_image
        from qcowlib.formats.qcow2.output import Qcow2Layout

        if request.standalone:
            opts = self._flat_options(disk, request)
            layout = Qcow2Layout(disk, opts, compress=request.compress)
            return write_image(layout, dst, protect=protect, progress=progress, hashers=hashers)
        opts, base = self._overlay_options(disk, dst, request)
        if base is not None:
            protect = protect + tuple(d.filename for d in base.chain)
        try:
            layout = Qcow2Layout(
                disk, opts, compress=request.compress, sparse=request.sparse_size > 0,
                backing=base,
            )  # fmt: skip
            return write_image(layout, dst, protect=protect, progress=progress, hashers=hashers)
        finally:
            if base is not None:
                base.close()

    def _overlay_options(
        self, disk: Disk, dst: str, request: OutputRequest
    ) -> tuple[CreateOptions, Disk | None]:
        """``convert``'s options, with ``-B``/``-F`` and the backing image opened."""
        from qcowlib.formats.qcow2.layout import parse_options

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
        return opts, base

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> LayoutStream:
        from qcowlib.formats.qcow2.output import qcow2_stream

        opts = self._flat_options(disk, request)
        return qcow2_stream(disk, opts, compress=request.compress, chunk_size=chunk_size)


QCOW2: Final = _Qcow2()


# -- new empty images and resizing (the registry's create and resize) --------------
def backing_size(
    image: str, backing: str, backing_fmt: str, open_backing: Callable[[str, str | None], Disk]
) -> int:
    """The virtual size of a backing file named as it will be recorded in ``image``."""
    full = resolve_linked_path(image, backing, "backing file", BackingPolicy())
    try:
        with open_backing(full, backing_fmt) as disk:
            return disk.virtual_size
    except QcowlibError as exc:
        raise InvalidArgument(f"Could not open backing image {backing!r}: {exc}") from None


def qcow2_options(
    path: str,
    size: int | None,
    options: Mapping[str, str] | None,
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
    open_backing: Callable[[str, str | None], Disk],
) -> CreateOptions:
    """Resolve ``-o`` options, ``-b``/``-F`` and the size as qemu-img create does."""
    from qcowlib.formats.qcow2.layout import parse_options

    opts = dict(options or {})
    if backing is not None:
        opts["backing_file"] = backing
    if backing_fmt is not None:
        opts["backing_fmt"] = backing_fmt
    bfile = opts.get("backing_file")
    if bfile and not opts.get("backing_fmt"):
        raise InvalidArgument(
            "Backing file specified without backing format (use -F; it is never guessed)"
        )
    if size is not None and "size" in opts:
        raise InvalidArgument("The image size must be specified only once")
    if size is None and "size" not in opts:
        if not bfile or unsafe:
            raise InvalidArgument("Image creation needs a size parameter")
        size = backing_size(path, bfile, opts["backing_fmt"], open_backing)
    elif bfile and not unsafe:
        backing_size(path, bfile, opts["backing_fmt"], open_backing)  # qemu-img opens it too
    return parse_options(size or 0, opts)


def create(
    path: str,
    size: int | None,
    options: Mapping[str, str],
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
    open_backing: Callable[[str, str | None], Disk],
) -> CreateOptions:
    """A new empty qcow2 image with qemu-img create's options; ``open_backing(path, fmt)``
    opens the backing file to learn its size (and to check it opens, unless ``unsafe``)."""
    from qcowlib.core.sinks import atomic_output
    from qcowlib.formats.qcow2.output import write_qcow2

    opts = qcow2_options(
        path, size, options, backing, backing_fmt, unsafe=unsafe, open_backing=open_backing
    )
    with atomic_output(path) as fd:
        write_qcow2(None, fd, opts)
    return opts


def resize(path: str, new_size: Callable[[int], int], *, shrink: bool) -> int:
    """Resize a qcow2 image in place to ``new_size(current)`` bytes (its backing file is
    not opened)."""
    from qcowlib.formats.qcow2.writer import open_rw_layer

    with open_rw_layer(path) as disk:
        new = new_size(disk.virtual_size)
        disk.resize(new, shrink=shrink)
        return new
