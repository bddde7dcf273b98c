"""raw output: ``convert -O raw`` (sparse) and the raw stream."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import OutputRequest, Progress, no_backing, no_compress, no_more_options
from qcowlib.core.sinks import atomic_output
from qcowlib.core.space import allocate_first_block, preallocate
from qcowlib.errors import InvalidArgument, QcowlibIOError

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.core.emit import HashSink, LayoutStream


class _Raw:
    name: Final = "raw"

    def check(self, request: OutputRequest) -> None:
        self.preallocation(request)

    def preallocation(self, request: OutputRequest) -> str:
        """The checked ``-o preallocation=off|falloc|full`` (the only raw option)."""
        if request.compress or request.options:
            if request.standalone:
                raise InvalidArgument("raw output takes no options and no compression")
            no_compress(request)
        no_backing(request, "raw")
        opts = dict(request.options)
        mode = opts.pop("preallocation", "off")
        no_more_options(opts)
        return raw_preallocation(mode)

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
        hashers: Sequence[HashSink] = (),
    ) -> int:
        from qcowlib.core.copy import write_raw
        from qcowlib.core.emit import hash_written

        mode = self.preallocation(request)
        with atomic_output(dst, protect=protect) as fd:
            write_raw(disk, fd, sparse_size=request.sparse_size, progress=progress)
            preallocate(fd, 0, disk.virtual_size, mode)
            allocate_first_block(fd, disk.virtual_size)
            if hashers:
                hash_written(fd, disk.virtual_size, hashers)
        return disk.virtual_size

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> LayoutStream:
        from qcowlib.core.emit import LayoutStream
        from qcowlib.formats.raw.output import RawLayout

        return LayoutStream(RawLayout(disk), chunk_size=chunk_size)


RAW: Final = _Raw()


def raw_preallocation(mode: str) -> str:
    """A raw image's ``preallocation`` mode, refused as qemu refuses it."""
    if mode == "metadata":
        raise InvalidArgument("Unsupported preallocation mode: metadata")
    if mode not in ("off", "falloc", "full"):
        raise InvalidArgument(f"Invalid parameter value for 'preallocation': '{mode}'")
    return mode


# -- new empty images and resizing (the registry's create and resize) --------------
def create(
    path: str,
    size: int | None,
    options: Mapping[str, str],
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
    open_backing: Callable[[str, str | None], Disk] | None = None,  # no backing for raw
) -> int:
    """A new raw image of ``size`` bytes (``-o preallocation=off|falloc|full``)."""
    if backing or backing_fmt:
        raise InvalidArgument("raw images cannot have a backing file")
    prealloc = "off"
    for key, value in options.items():
        if key == "preallocation":
            prealloc = raw_preallocation(value)
        elif key != "size":
            raise InvalidArgument(f"Invalid parameter '{key}'")
    if size is None:
        raise InvalidArgument("Image creation needs a size parameter")
    with atomic_output(path) as fd:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise QcowlibIOError(
                f"cannot write: {exc.strerror}", errno=exc.errno, file=path
            ) from None
        preallocate(fd, 0, size, prealloc)
        allocate_first_block(fd, size)
    return size


def resize(path: str, new_size: Callable[[int], int], *, shrink: bool) -> int:
    """Resize a raw image (the file) to ``new_size(current)`` bytes."""
    try:
        current = os.path.getsize(path)
    except OSError as exc:
        raise QcowlibIOError(f"cannot resize: {exc.strerror}", file=path) from None
    new = new_size(current)
    if new < current and not shrink:
        raise InvalidArgument("Use the --shrink option to perform a shrink operation.")
    try:
        os.truncate(path, new)
    except OSError as exc:
        raise QcowlibIOError(f"cannot resize: {exc.strerror}", file=path) from None
    return new
