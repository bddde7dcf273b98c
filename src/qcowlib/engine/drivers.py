"""Output drivers: what each format's writer needs from ``convert`` and ``flatten``.

The registry (:mod:`qcowlib.formats.registry`) names one driver per writable format;
``convert`` and ``flatten`` call it without knowing which format it is.  A driver:

* ``check(request)`` refuses what the format cannot do (compression, a backing file,
  unknown ``-o`` options) before the source is opened, as qemu-img does;
* ``convert(disk, dst, request, progress, protect)`` writes the whole image to ``dst``
  (a temporary name, renamed when complete; ``protect`` lists files it must not
  replace);
* ``stream(disk, request, chunk_size)`` returns the image as an in-order stream of
  exactly known size (None: the format has no stream writer);
* ``flatten_file(disk, dst, request, progress, protect)`` writes a standalone image
  faster than streaming it to a file, or returns None to let ``flatten`` stream it.

Writers and serializers load only when their format is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from qcowlib._units import parse_option_bool
from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.disk.base import Disk
    from qcowlib.engine.formatstream import VdiSerializer, VmdkSerializer
    from qcowlib.engine.serialize import Qcow2Serializer, RawSerializer
    from qcowlib.formats.qcow2.layout import CreateOptions

    Serializer = Qcow2Serializer | RawSerializer | VdiSerializer | VmdkSerializer

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class OutputRequest:
    """What ``convert`` and ``flatten`` ask of a new image; the format's driver checks it.

    ``options`` are the ``-o`` options; ``backing``/``backing_format`` are ``-B``/``-F``;
    ``sparse_size`` is ``-S``; ``standalone`` (``flatten``) refuses anything that would
    make the image depend on another file or that Glance's image inspector refuses;
    ``extent_name`` is the file name a streamed VMDK's descriptor gives its extent;
    ``open_backing(path, fmt)`` opens the backing image an overlay output is made over.
    """

    options: Mapping[str, str]
    compress: bool = False
    backing: str | None = None
    backing_format: str | None = None
    sparse_size: int = 4096
    standalone: bool = False
    extent_name: str = ""
    open_backing: Callable[[str, str | None], Disk] | None = None


class OutputDriver(Protocol):
    """A format's writer of new images (``convert -O``, ``flatten -O``).

    ``check`` refuses what the format cannot do before the source is opened;
    ``convert`` writes the whole image to ``dst`` (under a temporary name, never over a
    file in ``protect``); ``flatten_file`` writes a standalone image faster than
    streaming it, or returns None; ``stream`` returns the image as an in-order stream of
    exactly known size, or None when the format has no stream writer.  ``sparse`` says
    whether zero blocks of a streamed image may be left as holes in a file.
    """

    name: str
    sparse: bool

    def check(self, request: OutputRequest) -> None: ...

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> None: ...

    def flatten_file(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> int | None: ...

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Any: ...


__all__ = [
    "QCOW2",
    "RAW",
    "VDI",
    "VHDX",
    "VMDK",
    "VPC",
    "OutputDriver",
    "OutputRequest",
    "vdi_static",
    "vmdk_options",
]


def _no_compress(request: OutputRequest) -> None:
    if request.compress:
        raise InvalidArgument("Compression not supported for this file format")


def _no_backing(request: OutputRequest, name: str) -> None:
    if request.backing:
        raise InvalidArgument(f"Backing file not supported for file format '{name}'")


def _no_more_options(opts: dict[str, str]) -> None:
    if opts:
        raise InvalidArgument(f"Invalid parameter '{next(iter(opts))}'")


# -- raw ---------------------------------------------------------------------------------
class _Raw:
    name: Final = "raw"
    sparse: Final = True

    def check(self, request: OutputRequest) -> None:
        if request.compress or request.options:
            if request.standalone:
                raise InvalidArgument("raw output takes no options and no compression")
            _no_compress(request)
        _no_backing(request, "raw")
        _no_more_options(dict(request.options))

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> None:
        from qcowlib.engine.copy import write_raw
        from qcowlib.engine.output import atomic_output

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

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Serializer:
        from qcowlib.engine.serialize import RawSerializer

        return RawSerializer(disk, chunk_size=chunk_size)


# -- qcow2 -------------------------------------------------------------------------------
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
        from qcowlib.disk.chain import BackingPolicy, resolve_linked_path
        from qcowlib.engine.output import atomic_output
        from qcowlib.engine.qcow2out import write_qcow2
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
        from qcowlib.engine.output import atomic_output
        from qcowlib.engine.qcow2out import write_qcow2

        opts = self._flat_options(disk, request)
        with atomic_output(dst, protect=protect) as fd:
            return write_qcow2(disk, fd, opts, compress=request.compress, progress=progress)

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Serializer:
        from qcowlib.engine.serialize import Qcow2Serializer

        opts = self._flat_options(disk, request)
        return Qcow2Serializer(disk, opts, compress=request.compress, chunk_size=chunk_size)


# -- vdi ---------------------------------------------------------------------------------
def vdi_static(request: OutputRequest) -> bool:
    """Checked ``-o`` options of a VDI output: whether it is static."""
    _no_compress(request)
    opts = dict(request.options)
    static = parse_option_bool("static", opts.pop("static", "off"))
    _no_more_options(opts)
    return static


class _Vdi:
    name: Final = "vdi"
    sparse: Final = True

    def check(self, request: OutputRequest) -> None:
        _no_backing(request, "vdi")
        vdi_static(request)

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> None:
        from qcowlib.engine.output import atomic_output
        from qcowlib.engine.vdiout import write_vdi

        with atomic_output(dst, protect=protect) as fd:
            write_vdi(disk, fd, static=vdi_static(request), progress=progress)

    def flatten_file(self, *_: object) -> None:
        return None

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Serializer:
        from qcowlib.engine.formatstream import VdiSerializer

        return VdiSerializer(disk, static=vdi_static(request), chunk_size=chunk_size)


# -- vmdk --------------------------------------------------------------------------------
@dataclass(frozen=True)
class VmdkOptions:
    subformat: str
    adapter_type: str
    hw_version: str


def vmdk_options(request: OutputRequest) -> VmdkOptions:
    """Checked ``-o`` options of a VMDK output."""
    from qcowlib.engine.vmdkout import ADAPTER_TYPES, SUBFORMATS

    opts = dict(request.options)
    subformat = opts.pop("subformat", "monolithicSparse")
    if subformat not in SUBFORMATS:
        raise InvalidArgument(f"Invalid subformat '{subformat}' (this version writes "
                              "monolithicSparse and streamOptimized)")  # fmt: skip
    if request.compress and subformat != "streamOptimized":
        raise InvalidArgument("Compression is only supported with subformat=streamOptimized")
    adapter_type = opts.pop("adapter_type", "ide")
    if adapter_type not in ADAPTER_TYPES:
        raise InvalidArgument(f"Unknown adapter type: '{adapter_type}'")
    hw_version = opts.pop("hwversion", "undefined")
    if hw_version == "undefined":
        hw_version = "4"
    elif not hw_version.isdigit() or not 1 <= int(hw_version) <= 99:
        raise InvalidArgument(f"Invalid hwversion '{hw_version}'")
    _no_more_options(opts)
    return VmdkOptions(subformat, adapter_type, hw_version)


class _Vmdk:
    name: Final = "vmdk"
    sparse: Final = False

    def check(self, request: OutputRequest) -> None:
        if request.backing:
            raise InvalidArgument("Backing file not supported for file format 'vmdk' here")
        vmdk_options(request)

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> None:
        from qcowlib.engine.output import atomic_output
        from qcowlib.engine.vmdkout import write_vmdk

        o = vmdk_options(request)
        with atomic_output(dst, protect=protect) as fd:
            write_vmdk(
                disk,
                fd,
                subformat=o.subformat,
                progress=progress,
                extent_name=os.path.basename(dst),
                adapter_type=o.adapter_type,
                hw_version=o.hw_version,
            )

    def flatten_file(self, *_: object) -> None:
        return None

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Serializer:
        from qcowlib.engine.formatstream import VmdkSerializer

        o = vmdk_options(request)
        return VmdkSerializer(
            disk,
            subformat=o.subformat,
            extent_name=request.extent_name
            or os.path.splitext(os.path.basename(disk.filename))[0] + ".vmdk",
            adapter_type=o.adapter_type,
            hw_version=o.hw_version,
            chunk_size=chunk_size,
        )


# -- vpc and vhdx --------------------------------------------------------------------------
class _Vhd:
    """VHD (``vpc``) and VHDX: ``-o subformat=dynamic|fixed``, no stream writer yet."""

    sparse: Final = False

    def __init__(self, name: str, writer: str) -> None:
        self.name = name
        self._writer = writer

    def _subformat(self, request: OutputRequest) -> str:
        _no_compress(request)
        _no_backing(request, self.name)
        opts = dict(request.options)
        subformat = opts.pop("subformat", "dynamic")
        if subformat not in ("dynamic", "fixed"):
            raise InvalidArgument(f"Invalid subformat '{subformat}'")
        _no_more_options(opts)
        return subformat

    def check(self, request: OutputRequest) -> None:
        self._subformat(request)

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> None:
        import importlib

        from qcowlib.engine.output import atomic_output

        module, _, func = self._writer.partition(":")
        write = getattr(importlib.import_module(module), func)
        with atomic_output(dst, protect=protect) as fd:
            write(disk, fd, subformat=self._subformat(request), progress=progress)

    def flatten_file(self, *_: object) -> None:
        return None

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> None:
        return None


RAW: Final = _Raw()
QCOW2: Final = _Qcow2()
VDI: Final = _Vdi()
VMDK: Final = _Vmdk()
VPC: Final = _Vhd("vpc", "qcowlib.engine.vhdout:write_vhd")
VHDX: Final = _Vhd("vhdx", "qcowlib.engine.vhdxout:write_vhdx")
