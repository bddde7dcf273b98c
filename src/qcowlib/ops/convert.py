"""``convert``: write a disk's guest content as a new image."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from qcowlib.core.copy import Progress
from qcowlib.core.drivers import OutputRequest
from qcowlib.errors import InvalidArgument
from qcowlib.formats import registry
from qcowlib.formats.opener import open_disk

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.core.disk import Disk, Writer
    from qcowlib.core.emit import HashSink


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    out_format: str = "raw",
    *,
    src_format: str | None = None,
    compress: bool = False,
    options: Mapping[str, str] | None = None,
    backing: str | None = None,
    backing_format: str | None = None,
    sparse_size: int = 4096,
    progress: Progress | None = None,
    hashers: Sequence[HashSink] = (),
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> None:
    """Convert ``src`` (any readable image, with its chain) to ``dst`` in ``out_format``.

    The output is written under a temporary name and renamed into place when complete.
    ``sparse_size`` is qemu-img's ``-S``: all-zero blocks of that many bytes are left out
    (0 disables zero detection).  ``compress`` (``-c``) compresses qcow2 clusters.
    ``backing`` (``-B``) makes the qcow2 output an overlay of that image, holding only
    what differs from it; its format must be given (``backing_format``).  Raises
    :class:`UnsupportedFeature` for output formats this version cannot write and
    :class:`InvalidArgument` for bad options.

    ``hashers`` (for example ``hashlib.md5()``) are fed the output file's bytes in file
    order once it is written, so their digests are the file's; the source is read once.

    ``backing_policy`` (``follow``, ``contained``, ``none``) decides what of the
    source's chain is read and ``force_share`` (qemu-img ``-U``) reads a source another
    process has open for writing, as for :func:`qcowlib.open`.  An existing ``dst`` that
    another process (a running VM) holds is refused (:class:`ImageLocked`).
    """
    src = os.fspath(src)
    dst = os.fspath(dst)
    driver = registry.by_name(out_format).output_driver()
    if sparse_size < 0 or sparse_size % 512:
        raise InvalidArgument("sparse size must be a multiple of 512")
    opts_in = dict(options or {})
    request = OutputRequest(
        opts_in,
        compress=compress,
        backing=backing,
        backing_format=backing_format,
        sparse_size=sparse_size,
        open_backing=open_disk,
    )
    driver.check(request)
    with open_disk(src, src_format, backing_policy, force_share=force_share) as disk:
        inputs = tuple(d.filename for d in disk.chain)
        driver.convert(disk, dst, request, progress, inputs, hashers)


def convert_into(
    src: str,
    dst: str,
    out_format: str | None = None,
    *,
    src_format: str | None = None,
    target_is_zero: bool = False,
    sparse_size: int = 4096,
    progress: Progress | None = None,
) -> None:
    """``qemu-img convert -n``: write ``src``'s guest content into the existing image
    ``dst`` (opened for writing in place, QEMU's locks taken) instead of creating it.
    ``dst``'s format is probed; ``out_format``, when given, must agree (unlike qemu-img,
    which takes the target as raw without ``-O`` and would write raw bytes over a qcow2
    image's metadata).  Every range is written: zero ranges as zeros, unless
    ``target_is_zero`` says the target already reads as zeros (``--target-is-zero``).

    Raises :class:`InvalidArgument` when the target is smaller than the source or has a
    backing file while ``target_is_zero`` is given, :class:`UnsupportedFeature` for
    formats qcowlib cannot write in place.
    """
    if sparse_size < 0 or sparse_size % 512:
        raise InvalidArgument("sparse size must be a multiple of 512")
    out_format = _target_format(dst, out_format)
    open_target = registry.by_name(out_format).implementation("writer")
    with open_disk(src, src_format) as disk:
        if os.path.realpath(dst) in {os.path.realpath(d.filename) for d in disk.chain}:
            raise InvalidArgument(f"{dst} is an input of this conversion")
        target: Writer = open_target(dst)
        try:
            if target.virtual_size < disk.virtual_size:
                raise InvalidArgument("output file is smaller than input file")
            if target_is_zero and getattr(target, "backing_file_name", None):
                raise InvalidArgument(
                    "Cannot use --target-is-zero when the destination image has a backing file"
                )
            _copy_all(disk, target, target_is_zero, sparse_size, progress)
            target.flush()
        finally:
            target.close()


def _target_format(dst: str, out_format: str | None) -> str:
    """The format of an existing target: probed, and never a recognised format taken as
    raw (the contract's rule for reading holds for writing too)."""
    from qcowlib.core.hostfile import HostFile
    from qcowlib.formats.opener import probe_format

    host = HostFile(dst)
    try:
        probed = probe_format(host)
    finally:
        host.close()
    if out_format is None:
        return probed
    if probed not in (out_format, "raw"):
        raise InvalidArgument(f"{dst} is a {probed} image, not {out_format} (-O {probed})")
    return out_format


def _copy_all(
    disk: Disk, target: Writer, target_is_zero: bool, sparse_size: int, progress: Progress | None
) -> None:
    """Every extent of ``disk`` into ``target``: data (all-zero blocks of ``sparse_size``
    become zero writes), and zeros where the target may hold anything."""
    import numpy as np

    from qcowlib.core.hostfile import aligned_buffer

    chunk = 4 << 20
    buf = aligned_buffer(chunk)
    size = disk.virtual_size
    for ext in disk.extents():
        if ext.reads_zero:
            if not target_is_zero:
                target.write_zeroes(ext.start, ext.length)
        else:
            pos = ext.start
            while pos < ext.end:
                n = min(chunk, ext.end - pos)
                view = buf[:n]
                disk.read_extent(ext.clip(pos, pos + n), view)
                if sparse_size and n % 8 == 0 and not np.frombuffer(view, np.uint64).any():
                    if not target_is_zero:
                        target.write_zeroes(pos, n)
                else:
                    target.write(pos, view)
                pos += n
        if progress:
            progress(ext.end, size)
