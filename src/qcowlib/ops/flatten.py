"""``flatten``: a whole backing chain as one standalone image, to a file or a stream.

The output never has a backing file and never uses features Glance's image inspector
refuses (extended L2 entries, external data files), so it can be uploaded as is.  The
stream and the file are the same bytes: both come from the output format's one layout
through the one emitter (:mod:`qcowlib.core.emit`), which writes a file in one read
pass and plans a stream's exact size before its first byte.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from qcowlib.core.disk import Disk
from qcowlib.core.drivers import OutputDriver, OutputRequest, Serializer
from qcowlib.core.emit import STREAM_CHUNK, HashSink
from qcowlib.errors import DiskClosed, QcowlibIOError, UnsupportedFeature
from qcowlib.formats import registry
from qcowlib.formats.opener import open_disk

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from qcowlib.core.chain import BackingPolicy
else:  # what the annotation means at run time (typing.get_type_hints)
    WriteableBuffer = bytearray | memoryview

Progress = Callable[[int, int], None]
__all__ = ["ChainReport", "FlattenStream", "HashSink", "chain_of", "flatten", "flatten_stream"]
#: Told the chain being read, top first, as ``(filename, format)`` pairs, once it is open.
ChainReport = Callable[[Sequence[tuple[str, str]]], None]


def chain_of(disk: Disk) -> list[tuple[str, str]]:
    """``(filename, format)`` of every image of ``disk``'s chain, top first."""
    return [(d.filename, d.format) for d in disk.chain]


def _driver(out_format: str) -> OutputDriver:
    """The writer of ``out_format``, which must have an in-order stream."""
    if out_format not in registry.flattenable():
        registry.by_name(out_format)  # an unknown name is an invalid argument
        raise UnsupportedFeature(f"flattening to {out_format} is not supported yet")
    return registry.by_name(out_format).output_driver()


class FlattenStream(io.RawIOBase):
    """The flattened image as a readable binary file object of exact :attr:`size`.

    Read it as a file (``read``, ``readinto``; ``shutil.copyfileobj``, an
    ``io.BufferedReader`` or an HTTP client reading a body all work) or iterate it for
    chunks of about ``chunk_size`` bytes; both consume the same single pass, it does not
    seek.  ``len(stream)`` is :attr:`size`, known before the first byte.  The source chain
    stays open until the stream is exhausted or closed (it is also a context manager);
    reading a closed stream raises :class:`~qcowlib.errors.DiskClosed`.
    """

    def __init__(
        self,
        src: str | os.PathLike[str],
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
        super().__init__()
        driver = _driver(out_format)
        request = OutputRequest(
            dict(options or {}),
            compress=compress,
            standalone=True,
            extent_name=name or "",
        )
        driver.check(request)
        self.format = out_format
        self.name = os.fspath(src)
        self._disk = open_disk(src, src_format, backing_policy, force_share=force_share)
        try:
            self._ser: Serializer = driver.stream(self._disk, request, chunk_size)
        except BaseException:
            self._disk.close()
            raise
        #: Exact length of the stream in bytes, known before the first byte.
        self.size: int = self._ser.size
        self.virtual_size = self._disk.virtual_size
        #: The chain read, top first: ``(filename, format)`` pairs.
        self.chain = chain_of(self._disk)
        self._source: Iterator[bytes] | None = None
        self._pending = memoryview(b"")
        self._position = 0
        self._eof = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self._position}"
        return (
            f"<FlattenStream {self.format} of {self.name!r} size={self.size} "
            f"virtual_size={self.virtual_size} {state}>"
        )

    def __len__(self) -> int:
        return self.size

    def _next_chunk(
        self, progress: Progress | None = None, hashers: Sequence[HashSink] = ()
    ) -> bytes | memoryview | None:
        """The next chunk of the single pass (None at the end): what is left of one a
        read took part of, else the serializer's next chunk as it is (no copy)."""
        if self.closed:
            raise DiskClosed("stream is closed", file=self.name)
        if self._pending:
            chunk, self._pending = self._pending, memoryview(b"")
            return chunk
        if self._eof:
            return None
        if self._source is None:
            self._source = self._ser.chunks(progress, hashers)
        data = next(self._source, None)
        if data is None:
            self._eof = True
            self._disk.close()  # the whole image went out: release the chain now
            return None
        return data

    def chunks(
        self, progress: Progress | None = None, hashers: Sequence[HashSink] = ()
    ) -> Iterator[bytes]:
        """The rest of the stream in chunks; ``progress(done, total)`` is called as they
        are made and ``hashers`` are fed each piece (when iteration starts the pass).
        The stream closes at its end."""
        try:
            while not self.closed:
                chunk = self._next_chunk(progress, hashers)
                if chunk is None:
                    return
                self._position += len(chunk)
                yield chunk if isinstance(chunk, bytes) else bytes(chunk)
        finally:
            self.close()

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        """Fill ``buffer`` with the next bytes; 0 at the end of the stream."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            chunk = self._next_chunk()
            if chunk is None:
                break
            n = min(len(chunk), len(view) - done)
            view[done : done + n] = memoryview(chunk)[:n]
            self._pending = memoryview(chunk)[n:]
            done += n
        self._position += done
        return done

    def tell(self) -> int:
        """Bytes of the stream handed out so far."""
        return self._position

    def close(self) -> None:
        """Stop the pass and close the source chain (closing twice is harmless)."""
        if not self.closed:
            if self._source is not None and hasattr(self._source, "close"):
                self._source.close()
            if hasattr(self, "_disk"):
                self._disk.close()
        super().close()


def flatten_stream(
    src: str | os.PathLike[str],
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


def _to_stdout(
    stream: FlattenStream,
    progress: Progress | None,
    hashers: Sequence[HashSink],
    on_chain: ChainReport | None,
) -> int:
    """``flatten`` to ``-``: the stream, written to stdout as it is made."""
    out = sys.stdout.buffer
    with stream:
        if on_chain is not None:
            on_chain(stream.chain)
        for piece in stream.chunks(progress, hashers):
            try:
                out.write(piece)
            except OSError as exc:
                raise QcowlibIOError(f"cannot write to stdout: {exc.strerror}") from None
        out.flush()
        return stream.size


def flatten(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
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
    :func:`flatten_stream` yields (raw files are written sparse).  The chain is read once
    to a file (a stream reads it twice: to plan its exact size, then to emit).
    ``hashers`` (for example ``hashlib.md5()`` and ``hashlib.sha512()``) are fed the
    output's bytes in file order, so their digests are the file's, without a second
    read of the chain.  ``backing_policy`` and ``force_share`` are
    :func:`qcowlib.open`'s; ``on_chain`` is told the chain read, top first, once it is
    open.  An existing ``dst`` that another process (a running VM)
    holds is refused (:class:`~qcowlib.errors.ImageLocked`).
    """
    src = os.fspath(src)
    dst = os.fspath(dst)
    if dst == "-":
        stream = flatten_stream(
            src,
            out_format,
            src_format=src_format,
            options=options,
            compress=compress,
            backing_policy=backing_policy,
            force_share=force_share,
        )
        return _to_stdout(stream, progress, hashers, on_chain)
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
        return driver.convert(disk, dst, request, progress, inputs, hashers)
