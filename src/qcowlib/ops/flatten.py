"""``flatten``: a whole backing chain as one standalone image, to a file or a stream.

The output never has a backing file and never uses features Glance's image inspector
refuses (extended L2 entries, external data files), so it can be uploaded as is.  The
stream and the file are the same bytes: streams come from :mod:`qcowlib.engine.serialize`
(plan, then emit), a qcow2 file from the one-pass writer of
:mod:`qcowlib.engine.qcow2out`, which lays clusters out exactly as the serializer plans.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, TypeAlias

from qcowlib.disk._file import pwrite_all
from qcowlib.disk.base import Disk
from qcowlib.disk.chain import open_disk
from qcowlib.engine.copy import write_raw
from qcowlib.engine.output import atomic_output
from qcowlib.engine.qcow2out import reserve, write_qcow2
from qcowlib.engine.serialize import STREAM_CHUNK, Qcow2Serializer, RawSerializer
from qcowlib.engine.zero import is_zero
from qcowlib.errors import InvalidArgument, QcowlibIOError, UnsupportedFeature
from qcowlib.formats.qcow2.layout import CreateOptions, parse_options
from qcowlib.ops.convert import vdi_options, vmdk_options

if TYPE_CHECKING:
    # The VDI and VMDK serializers load only when those formats are asked for.
    from qcowlib.engine.formatstream import VdiSerializer, VmdkSerializer

Progress = Callable[[int, int], None]
FLATTEN_FORMATS = ("qcow2", "raw", "vmdk", "vdi")


class HashSink(Protocol):
    """What the writers feed output bytes to: anything with hashlib's ``update``."""

    def update(self, data: bytes, /) -> None: ...


Serializer: TypeAlias = "Qcow2Serializer | RawSerializer | VdiSerializer | VmdkSerializer"


def _qcow2_serializer(
    disk: Disk, options: Mapping[str, str] | None, compress: bool, chunk_size: int
) -> Qcow2Serializer:
    opts = _flatten_options(disk, options)
    return Qcow2Serializer(disk, opts, compress=compress, chunk_size=chunk_size)


def _flatten_options(disk: Disk, options: Mapping[str, str] | None) -> CreateOptions:
    """qcow2 creation options for a flattened image: no backing, nothing Glance refuses."""
    opts_in = dict(options or {})
    for key in ("backing_file", "backing_fmt"):
        if opts_in.get(key):
            raise InvalidArgument(f"flatten output has no backing file ({key} given)")
    opts = parse_options(disk.virtual_size, opts_in)
    if opts.extended_l2:
        raise InvalidArgument(
            "flatten does not write extended L2 entries: Glance's image inspector refuses them"
        )
    if opts.preallocation != "off":
        raise InvalidArgument("flatten does not preallocate")
    return opts


class FlattenStream:
    """The flattened image as an iterable of byte chunks, with its exact ``size``.

    Iterate once.  The source chain stays open until the stream is exhausted or
    :meth:`close` is called (also a context manager).
    """

    def __init__(
        self,
        src: str,
        out_format: str = "qcow2",
        *,
        src_format: str | None = None,
        options: Mapping[str, str] | None = None,
        compress: bool = False,
        chunk_size: int = STREAM_CHUNK,
        name: str | None = None,
    ) -> None:
        if out_format not in FLATTEN_FORMATS:
            raise UnsupportedFeature(f"flattening to {out_format} is not supported yet")
        self.format = out_format
        self._disk = open_disk(src, src_format)
        try:
            self._ser: Serializer
            if out_format == "qcow2":
                self._ser = _qcow2_serializer(self._disk, options, compress, chunk_size)
            elif out_format == "vdi":
                from qcowlib.engine.formatstream import VdiSerializer

                static = vdi_options(options or {}, compress)
                self._ser = VdiSerializer(self._disk, static=static, chunk_size=chunk_size)
            elif out_format == "vmdk":
                from qcowlib.engine.formatstream import VmdkSerializer

                subformat, adapter, hw = vmdk_options(options or {}, compress)
                if name is None:
                    name = os.path.splitext(os.path.basename(src))[0] + ".vmdk"
                self._ser = VmdkSerializer(
                    self._disk,
                    subformat=subformat,
                    extent_name=name,
                    adapter_type=adapter,
                    hw_version=hw,
                    chunk_size=chunk_size,
                )
            else:
                if compress or options:
                    raise InvalidArgument("raw output takes no options and no compression")
                self._ser = RawSerializer(self._disk, chunk_size=chunk_size)
        except BaseException:
            self._disk.close()
            raise
        #: Exact length of the stream in bytes, known before the first byte.
        self.size: int = self._ser.size
        self.virtual_size = self._disk.virtual_size

    def chunks(self, progress: Progress | None = None) -> Iterator[bytes]:
        try:
            yield from self._ser.chunks(progress)
        finally:
            self.close()

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    def close(self) -> None:
        self._disk.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def flatten_stream(
    src: str,
    out_format: str = "qcow2",
    *,
    src_format: str | None = None,
    options: Mapping[str, str] | None = None,
    compress: bool = False,
    chunk_size: int = STREAM_CHUNK,
    name: str | None = None,
) -> FlattenStream:
    """Open ``src`` with its chain and return its flattened image as a stream.

    ``stream.size`` is exact before the first byte; nothing is written to disk.  ``name``
    is the file name a VMDK's descriptor gives its extent (default: the source's base
    name with ``.vmdk``).  Raises :class:`QcowlibError` subclasses for bad sources or
    options.
    """
    return FlattenStream(
        src,
        out_format,
        src_format=src_format,
        options=options,
        compress=compress,
        chunk_size=chunk_size,
        name=name,
    )


def flatten(
    src: str,
    dst: str,
    out_format: str = "qcow2",
    *,
    src_format: str | None = None,
    options: Mapping[str, str] | None = None,
    compress: bool = False,
    progress: Progress | None = None,
    hashers: Sequence[HashSink] = (),
) -> int:
    """Write ``src``'s whole chain as one standalone image at ``dst`` (``-``: stdout).

    Returns the number of bytes written.  The file holds exactly the bytes
    :func:`flatten_stream` yields (raw files are written sparse).  ``hashers`` (for
    example ``hashlib.md5()`` and ``hashlib.sha512()``) are fed the output's bytes in
    file order as they are written, so their digests are the file's without reading it
    back; the image is then written from its planned layout in file order (the chain is
    read twice, as for a stream).
    """
    if dst == "-":
        out = sys.stdout.buffer
        with flatten_stream(
            src, out_format, src_format=src_format, options=options, compress=compress
        ) as stream:
            for piece in stream.chunks(progress):
                for h in hashers:
                    h.update(piece)
                try:
                    out.write(piece)
                except OSError as exc:
                    raise QcowlibIOError(f"cannot write to stdout: {exc.strerror}") from None
            out.flush()
            return stream.size
    if out_format == "raw" and not options and not compress and not hashers:
        with open_disk(src, src_format) as disk:
            inputs = tuple(d.filename for d in disk.chain)
            with atomic_output(dst, protect=inputs) as fd:
                write_raw(disk, fd, progress=progress)
            return disk.virtual_size
    if out_format == "qcow2" and not hashers:
        # One read pass (and one compression of each cluster): the one-pass writer lays
        # the image out exactly as the stream does (see qcowlib.engine.serialize), so the
        # file holds the stream's bytes.
        with open_disk(src, src_format) as disk:
            opts = _flatten_options(disk, options)
            inputs = tuple(d.filename for d in disk.chain)
            with atomic_output(dst, protect=inputs) as fd:
                return write_qcow2(disk, fd, opts, compress=compress, progress=progress)
    with flatten_stream(
        src, out_format, src_format=src_format, options=options, compress=compress,
        chunk_size=4 * 1024 * 1024, name=os.path.basename(dst),
    ) as stream:  # fmt: skip
        inputs = tuple(d.filename for d in stream._disk.chain)
        with atomic_output(dst, protect=inputs) as fd:
            sparse = out_format in ("vdi", "raw")  # their zero runs stay holes
            if not compress and not sparse:
                reserve(fd, 0, stream.size)
            pos = 0
            for piece in stream.chunks(progress):
                for h in hashers:
                    h.update(piece)
                if not sparse or not is_zero(piece):
                    pwrite_all(fd, piece, pos)
                pos += len(piece)
            if pos != stream.size:
                raise QcowlibIOError("internal: flattened size differs from the plan")
            os.ftruncate(fd, pos)
        return stream.size
