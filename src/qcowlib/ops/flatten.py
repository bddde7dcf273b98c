"""``flatten``: a whole backing chain as one standalone image, to a file or a stream.

The output never has a backing file and never uses features Glance's image inspector
refuses (extended L2 entries, external data files), so it can be uploaded as is.  The
stream and the file are the same bytes: both come from the output format's one layout
through the one emitter (:mod:`qcowlib.core.emit`), which writes a file in one read
pass and plans a stream's exact size before its first byte.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Self

from qcowlib.core.drivers import OutputDriver, OutputRequest, Serializer
from qcowlib.core.emit import STREAM_CHUNK, HashSink
from qcowlib.errors import QcowlibIOError, UnsupportedFeature
from qcowlib.formats import registry
from qcowlib.formats.opener import open_disk

Progress = Callable[[int, int], None]
__all__ = ["FlattenStream", "HashSink", "flatten", "flatten_stream"]


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
        self._disk = open_disk(src, src_format)
        try:
            self._ser: Serializer = driver.stream(self._disk, request, chunk_size)
        except BaseException:
            self._disk.close()
            raise
        #: Exact length of the stream in bytes, known before the first byte.
        self.size: int = self._ser.size
        self.virtual_size = self._disk.virtual_size

    def chunks(
        self, progress: Progress | None = None, hashers: Sequence[HashSink] = ()
    ) -> Iterator[bytes]:
        """The image in file order; ``hashers`` are fed each piece as it goes."""
        try:
            yield from self._ser.chunks(progress, hashers)
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
    :func:`flatten_stream` yields (raw files are written sparse).  The chain is read once
    to a file (a stream reads it twice: to plan its exact size, then to emit).
    ``hashers`` (for example ``hashlib.md5()`` and ``hashlib.sha512()``) are fed the
    output's bytes in file order, so their digests are the file's, without a second
    read of the chain.
    """
    if dst == "-":
        out = sys.stdout.buffer
        with flatten_stream(
            src, out_format, src_format=src_format, options=options, compress=compress
        ) as stream:
            for piece in stream.chunks(progress, hashers):
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
    with open_disk(src, src_format) as disk:
        inputs = tuple(d.filename for d in disk.chain)
        return driver.convert(disk, dst, request, progress, inputs, hashers)
