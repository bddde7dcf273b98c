"""raw output: ``convert -O raw`` (sparse) and the raw stream."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import OutputRequest, Progress, no_backing, no_compress, no_more_options
from qcowlib.core.sinks import atomic_output
from qcowlib.errors import InvalidArgument, QcowlibIOError

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.core.emit import HashSink, LayoutStream


class _Raw:
    name: Final = "raw"

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
        hashers: Sequence[HashSink] = (),
    ) -> int:
        from qcowlib.core.copy import write_raw
        from qcowlib.core.emit import hash_written

        with atomic_output(dst, protect=protect) as fd:
            write_raw(disk, fd, sparse_size=request.sparse_size, progress=progress)
            if hashers:
                hash_written(fd, disk.virtual_size, hashers)
        return disk.virtual_size

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> LayoutStream:
        from qcowlib.core.emit import LayoutStream
        from qcowlib.formats.raw.output import RawLayout

        return LayoutStream(RawLayout(disk), chunk_size=chunk_size)


RAW: Final = _Raw()


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
            prealloc = value
        elif key != "size":
            raise InvalidArgument(f"Invalid parameter '{key}'")
    if size is None:
        raise InvalidArgument("Image creation needs a size parameter")
    with atomic_output(path) as fd:
        try:
            os.ftruncate(fd, size)
            if prealloc == "falloc":
                os.posix_fallocate(fd, 0, size) if size else None
            elif prealloc == "full":
                zero = bytes(1 << 20)
                for pos in range(0, size, len(zero)):
                    os.pwrite(fd, zero[: min(len(zero), size - pos)], pos)
            elif prealloc != "off":
                raise InvalidArgument(f"Invalid parameter value for 'preallocation': '{prealloc}'")
        except OSError as exc:
            raise QcowlibIOError(
                f"cannot write: {exc.strerror}", errno=exc.errno, file=path
            ) from None
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
