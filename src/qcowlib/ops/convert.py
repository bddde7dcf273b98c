"""``convert``: write a disk's guest content as a new image."""

from __future__ import annotations

from collections.abc import Mapping

from qcowlib.disk.chain import open_disk
from qcowlib.engine.copy import Progress, write_raw
from qcowlib.engine.output import atomic_output
from qcowlib.errors import InvalidArgument, UnsupportedFeature

WRITABLE_FORMATS = ("raw",)


def convert(
    src: str,
    dst: str,
    out_format: str = "raw",
    *,
    src_format: str | None = None,
    compress: bool = False,
    options: Mapping[str, str] | None = None,
    sparse_size: int = 4096,
    progress: Progress | None = None,
) -> None:
    """Convert ``src`` (any readable image, with its chain) to ``dst`` in ``out_format``.

    The output is written under a temporary name and renamed into place when complete.
    ``sparse_size`` is qemu-img's ``-S``: all-zero blocks of that many bytes are left as
    holes (0 disables zero detection).  Raises :class:`UnsupportedFeature` for output
    formats this version cannot write and :class:`InvalidArgument` for bad options.
    """
    if out_format not in WRITABLE_FORMATS:
        raise UnsupportedFeature(f"converting to {out_format} is not supported yet")
    if compress:
        raise InvalidArgument(f"{out_format} does not support compression")
    if options:
        raise InvalidArgument(f"{out_format} takes no options: {', '.join(options)}")
    if sparse_size < 0 or sparse_size % 512:
        raise InvalidArgument("sparse size must be a multiple of 512")
    with open_disk(src, src_format) as disk:
        inputs = tuple(d.filename for d in disk.chain)
        with atomic_output(dst, protect=inputs) as fd:
            write_raw(disk, fd, sparse_size=sparse_size, progress=progress)
