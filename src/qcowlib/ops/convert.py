"""``convert``: write a disk's guest content as a new image."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from qcowlib._units import parse_option_bool
from qcowlib.disk.base import Disk
from qcowlib.disk.chain import BackingPolicy, open_disk, resolve_linked_path
from qcowlib.engine.copy import Progress, write_raw
from qcowlib.engine.output import atomic_output
from qcowlib.engine.qcow2out import write_qcow2
from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats.qcow2.layout import parse_options

if TYPE_CHECKING:
    from qcowlib.ops.flatten import HashSink

WRITABLE_FORMATS = ("raw", "qcow2", "vdi", "vpc", "vmdk", "vhdx")


def vdi_options(opts_in: Mapping[str, str], compress: bool) -> bool:
    """Checked ``-o`` options of a VDI output: whether it is static."""
    opts = dict(opts_in)
    if compress:
        raise InvalidArgument("Compression not supported for this file format")
    static = parse_option_bool("static", opts.pop("static", "off"))
    if opts:
        raise InvalidArgument(f"Invalid parameter '{next(iter(opts))}'")
    return static


def vmdk_options(opts_in: Mapping[str, str], compress: bool) -> tuple[str, str, str]:
    """Checked ``-o`` options of a VMDK output: subformat, adapter type, hardware version."""
    from qcowlib.engine.vmdkout import ADAPTER_TYPES
    from qcowlib.engine.vmdkout import SUBFORMATS as VMDK_SUBFORMATS

    opts = dict(opts_in)
    subformat = opts.pop("subformat", "monolithicSparse")
    if subformat not in VMDK_SUBFORMATS:
        raise InvalidArgument(f"Invalid subformat '{subformat}' (this version writes "
                              "monolithicSparse and streamOptimized)")  # fmt: skip
    if compress and subformat != "streamOptimized":
        raise InvalidArgument("Compression is only supported with subformat=streamOptimized")
    adapter_type = opts.pop("adapter_type", "ide")
    if adapter_type not in ADAPTER_TYPES:
        raise InvalidArgument(f"Unknown adapter type: '{adapter_type}'")
    hw_version = opts.pop("hwversion", "undefined")
    if hw_version == "undefined":
        hw_version = "4"
    elif not hw_version.isdigit() or not 1 <= int(hw_version) <= 99:
        raise InvalidArgument(f"Invalid hwversion '{hw_version}'")
    if opts:
        raise InvalidArgument(f"Invalid parameter '{next(iter(opts))}'")
    return subformat, adapter_type, hw_version


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
    """
    if out_format not in WRITABLE_FORMATS:
        raise UnsupportedFeature(f"converting to {out_format} is not supported yet")
    if sparse_size < 0 or sparse_size % 512:
        raise InvalidArgument("sparse size must be a multiple of 512")
    opts_in = dict(options or {})
    if hashers:
        _check_hashed(out_format, opts_in, backing, sparse_size)
        from qcowlib.ops.flatten import flatten

        flatten(src, dst, out_format, src_format=src_format, options=opts_in,
                compress=compress, progress=progress, hashers=hashers)  # fmt: skip
        return
    if out_format == "raw":
        if compress:
            raise InvalidArgument("Compression not supported for this file format")
        if backing:
            raise InvalidArgument("Backing file not supported for file format 'raw'")
        if opts_in:
            raise InvalidArgument(f"Invalid parameter '{next(iter(opts_in))}'")
    static = False
    if out_format == "vdi":
        if backing:
            raise InvalidArgument("Backing file not supported for file format 'vdi'")
        static = vdi_options(opts_in, compress)
    subformat = "dynamic"
    adapter_type, hw_version = "ide", "4"
    if out_format == "vmdk":
        if backing:
            raise InvalidArgument("Backing file not supported for file format 'vmdk' here")
        subformat, adapter_type, hw_version = vmdk_options(opts_in, compress)
    if out_format in ("vpc", "vhdx"):
        if compress:
            raise InvalidArgument("Compression not supported for this file format")
        if backing:
            raise InvalidArgument(f"Backing file not supported for file format '{out_format}'")
        subformat = opts_in.pop("subformat", "dynamic")
        if subformat not in ("dynamic", "fixed"):
            raise InvalidArgument(f"Invalid subformat '{subformat}'")
        if opts_in:
            raise InvalidArgument(f"Invalid parameter '{next(iter(opts_in))}'")
    with open_disk(src, src_format) as disk:
        inputs = tuple(d.filename for d in disk.chain)
        if out_format == "vmdk":
            from qcowlib.engine.vmdkout import write_vmdk

            with atomic_output(dst, protect=inputs) as fd:
                write_vmdk(
                    disk,
                    fd,
                    subformat=subformat,
                    progress=progress,
                    extent_name=os.path.basename(dst),
                    adapter_type=adapter_type,
                    hw_version=hw_version,
                )
            return
        if out_format == "vhdx":
            from qcowlib.engine.vhdxout import write_vhdx

            with atomic_output(dst, protect=inputs) as fd:
                write_vhdx(disk, fd, subformat=subformat, progress=progress)
            return
        if out_format == "vpc":
            from qcowlib.engine.vhdout import write_vhd

            with atomic_output(dst, protect=inputs) as fd:
                write_vhd(disk, fd, subformat=subformat, progress=progress)
            return
        if out_format == "raw":
            with atomic_output(dst, protect=inputs) as fd:
                write_raw(disk, fd, sparse_size=sparse_size, progress=progress)
            return
        if out_format == "vdi":
            from qcowlib.engine.vdiout import write_vdi

            with atomic_output(dst, protect=inputs) as fd:
                write_vdi(disk, fd, static=static, progress=progress)
            return
        _convert_qcow2(
            disk, dst, opts_in, compress, backing, backing_format, sparse_size, progress, inputs
        )


def _check_hashed(
    out_format: str, opts_in: Mapping[str, str], backing: str | None, sparse_size: int
) -> None:
    """Refuse what the in-order writers (which feed hashers) cannot write."""
    if out_format not in ("raw", "qcow2", "vmdk", "vdi"):
        raise InvalidArgument(f"digests while converting are not available for {out_format}")
    if backing or opts_in.get("backing_file"):
        raise InvalidArgument("digests while converting are not available with a backing file")
    if sparse_size != 4096:
        raise InvalidArgument("digests while converting need the default sparse size (-S)")
    if opts_in.get("extended_l2", "off") != "off" or opts_in.get("preallocation", "off") != "off":
        raise InvalidArgument(
            "digests while converting are not available with extended_l2 or preallocation"
        )


def _convert_qcow2(
    disk: Disk,
    dst: str,
    opts_in: dict[str, str],
    compress: bool,
    backing: str | None,
    backing_format: str | None,
    sparse_size: int,
    progress: Progress | None,
    inputs: tuple[str, ...],
) -> None:
    if backing is not None:
        opts_in["backing_file"] = backing
    if backing_format is not None:
        opts_in["backing_fmt"] = backing_format
    if opts_in.get("backing_file") and not opts_in.get("backing_fmt"):
        raise InvalidArgument("-B needs the backing format (-F): it is never guessed")
    opts = parse_options(disk.virtual_size, opts_in)
    if opts.preallocation != "off":
        raise InvalidArgument("convert does not support preallocation (create, then write)")
    base: Disk | None = None
    if opts.backing_file:
        full = resolve_linked_path(dst, opts.backing_file, "backing file", BackingPolicy())
        base = open_disk(full, opts.backing_fmt)
    protect = inputs + (tuple(d.filename for d in base.chain) if base is not None else ())
    try:
        with atomic_output(dst, protect=protect) as fd:
            write_qcow2(
                disk,
                fd,
                opts,
                compress=compress,
                sparse_size=sparse_size,
                backing=base,
                progress=progress,
            )
    finally:
        if base is not None:
            base.close()
