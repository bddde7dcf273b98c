"""``convert``: write a disk's guest content as a new image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from qcowlib.core.copy import Progress
from qcowlib.core.drivers import OutputRequest
from qcowlib.errors import InvalidArgument
from qcowlib.formats import registry
from qcowlib.formats.opener import open_disk

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.ops.flatten import HashSink


def convert(
    src: str,
    dst: str,
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
    order as they are written, so their digests are the file's without reading it back:
    for raw, qcow2, vmdk and vdi outputs with no backing file and the default
    ``sparse_size``, written from a layout planned first (as :func:`~qcowlib.flatten`
    writes it; the source is read twice).

    ``backing_policy`` (``follow``, ``contained``, ``none``) decides what of the
    source's chain is read and ``force_share`` (qemu-img ``-U``) reads a source another
    process has open for writing, as for :func:`qcowlib.open`.  An existing ``dst`` that
    another process (a running VM) holds is refused (:class:`ImageLocked`).
    """
    driver = registry.by_name(out_format).output_driver()
    if sparse_size < 0 or sparse_size % 512:
        raise InvalidArgument("sparse size must be a multiple of 512")
    opts_in = dict(options or {})
    if hashers:
        _check_hashed(out_format, opts_in, backing, sparse_size)
        from qcowlib.ops.flatten import flatten

        flatten(src, dst, out_format, src_format=src_format, options=opts_in,
                compress=compress, progress=progress, hashers=hashers,
                backing_policy=backing_policy, force_share=force_share)  # fmt: skip
        return
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
        driver.convert(disk, dst, request, progress, inputs)


def _check_hashed(
    out_format: str, opts_in: Mapping[str, str], backing: str | None, sparse_size: int
) -> None:
    """Refuse what the in-order writers (which feed hashers) cannot write."""
    if out_format not in registry.flattenable():
        raise InvalidArgument(f"digests while converting are not available for {out_format}")
    if backing or opts_in.get("backing_file"):
        raise InvalidArgument("digests while converting are not available with a backing file")
    if sparse_size != 4096:
        raise InvalidArgument("digests while converting need the default sparse size (-S)")
    if opts_in.get("extended_l2", "off") != "off" or opts_in.get("preallocation", "off") != "off":
        raise InvalidArgument(
            "digests while converting are not available with extended_l2 or preallocation"
        )
