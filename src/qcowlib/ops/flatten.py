"""``flatten``: a whole backing chain as one standalone image, to a file or a stream.

The output never has a backing file and never uses features Glance's image inspector
refuses (extended L2 entries, external data files), so it can be uploaded as is.  The
stream and the file are the same bytes: streams come from :mod:`qcowlib.formats.qcow2.stream`
(plan, then emit), a qcow2 file from the one-pass writer of
:mod:`qcowlib.formats.qcow2.output`, which lays clusters out exactly as the serializer plans.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from qcowlib.core.disk import Disk
from qcowlib.core.drivers import OutputDriver, OutputRequest, Serializer
from qcowlib.core.hostfile import pwrite_all, reserve
from qcowlib.core.sinks import atomic_output
from qcowlib.core.zero import is_zero
from qcowlib.errors import QcowlibIOError, UnsupportedFeature
from qcowlib.formats import registry
from qcowlib.formats.opener import open_disk
from qcowlib.formats.qcow2.stream import STREAM_CHUNK

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

Progress = Callable[[int, int], None]
#: Told the chain being read, top first, as ``(filename, format)`` pairs, once it is open.
ChainReport = Callable[[Sequence[tuple[str, str]]], None]


def chain_of(disk: Disk) -> list[tuple[str, str]]:
    """``(filename, format)`` of every image of ``disk``'s chain, top first."""
    return [(d.filename, d.format) for d in disk.chain]


class HashSink(Protocol):
    """What the writers feed output bytes to: anything with hashlib's ``update``."""

    def update(self, data: bytes, /) -> None: ...


def _driver(out_format: str) -> OutputDriver:
    """The writer of ``out_format``, which must have an in-order stream."""
    if out_format not in registry.flattenable():
        registry.by_name(out_format)  # an unknown name is an invalid argument
        raise UnsupportedFeature(f"flattening to {out_format} is not supported yet")
    return registry.by_name(out_format).output_driver()


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
        backing_policy: BackingPolicy | str | None = None,
        force_share: bool = False,
    ) -> None:
        driver = _driver(out_format)
        request = OutputRequest(
            dict(options or {}),
            compress=compress,
            standalone=True,
            extent_name=name or "",
        )
        driver.check(request)
        self.format = out_format
        self._disk = open_disk(src, src_format, backing_policy, force_share=force_share)
        try:
            ser = driver.stream(self._disk, request, chunk_size)
            if ser is None:
                raise UnsupportedFeature(f"flattening to {out_format} is not supported yet")
            self._ser: Serializer = ser
        except BaseException:
            self._disk.close()
            raise
        #: Exact length of the stream in bytes, known before the first byte.
        self.size: int = self._ser.size
        self.virtual_size = self._disk.virtual_size
        #: The chain read, top first: ``(filename, format)`` pairs.
        self.chain = chain_of(self._disk)

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
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> FlattenStream:
    """Open ``src`` with its chain and return its flattened image as a stream.

    ``stream.size`` is exact before the first byte; nothing is written to disk.  ``name``
    is the file name a VMDK's descriptor gives its extent (default: the source's base
    name with ``.vmdk``).  ``backing_policy`` (``follow``, ``contained``, ``none``) and
    ``force_share`` (qemu-img ``-U``) are :func:`qcowlib.open`'s.  Raises
    :class:`QcowlibError` subclasses for bad sources or options.
    """
    return FlattenStream(
        src,
        out_format,
        src_format=src_format,
        options=options,
        compress=compress,
        chunk_size=chunk_size,
        name=name,
        backing_policy=backing_policy,
        force_share=force_share,
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
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
    on_chain: ChainReport | None = None,
) -> int:
    """Write ``src``'s whole chain as one standalone image at ``dst`` (``-``: stdout).

    Returns the number of bytes written.  The file holds exactly the bytes
    :func:`flatten_stream` yields (raw files are written sparse).  ``hashers`` (for
    example ``hashlib.md5()`` and ``hashlib.sha512()``) are fed the output's bytes in
    file order as they are written, so their digests are the file's without reading it
    back; the image is then written from its planned layout in file order (the chain is
    read twice, as for a stream).  ``backing_policy`` and ``force_share`` are
    :func:`qcowlib.open`'s; ``on_chain`` is told the chain read, top first, once it is
    open.  An existing ``dst`` that another process (a running VM)
    holds is refused (:class:`~qcowlib.errors.ImageLocked`).
    """
    if dst == "-":
        out = sys.stdout.buffer
        with flatten_stream(
            src,
            out_format,
            src_format=src_format,
            options=options,
            compress=compress,
            backing_policy=backing_policy,
            force_share=force_share,
        ) as stream:
            if on_chain is not None:
                on_chain(stream.chain)
            for piece in stream.chunks(progress):
                for h in hashers:
                    h.update(piece)
                try:
                    out.write(piece)
                except OSError as exc:
                    raise QcowlibIOError(f"cannot write to stdout: {exc.strerror}") from None
            out.flush()
            return stream.size
    driver = _driver(out_format)
    request = OutputRequest(
        dict(options or {}),
        compress=compress,
        standalone=True,
        extent_name=os.path.basename(dst),
    )
    driver.check(request)
    with open_disk(src, src_format, backing_policy, force_share=force_share) as disk:
        inputs = tuple(d.filename for d in disk.chain)
        if on_chain is not None:
            on_chain(chain_of(disk))
        if not hashers:
            written = driver.flatten_file(disk, dst, request, progress, inputs)
            if written is not None:
                return written
        ser: Serializer | None = driver.stream(disk, request, 4 * 1024 * 1024)
        if ser is None:
            raise UnsupportedFeature(f"flattening to {out_format} is not supported yet")
        with atomic_output(dst, protect=inputs) as fd:
            if not compress and not driver.sparse:
                reserve(fd, 0, ser.size)
            pos = 0
            for piece in ser.chunks(progress):
                for h in hashers:
                    h.update(piece)
                if not driver.sparse or not is_zero(piece):
                    pwrite_all(fd, piece, pos)
                pos += len(piece)
            if pos != ser.size:
                raise QcowlibIOError("internal: flattened size differs from the plan")
            os.ftruncate(fd, pos)
        return ser.size
