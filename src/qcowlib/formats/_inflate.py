"""Bounded decompression of one block, as the compressed read-only formats need it.

cloop blocks and DMG chunks each inflate to a size the image declares.  QEMU inflates
into a buffer of exactly that size and fails the read unless the stream ends there
(``inflate(..., Z_FINISH) == Z_STREAM_END`` with ``total_out`` equal to the size;
``BZ2_bzDecompress`` likewise).  These helpers do the same without ever producing more
than the declared size: a block that would inflate past it (a decompression bomb) is
refused after at most ``size + 1`` bytes of output, one that ends short is refused too.
Pure: bytes in, bytes out.
"""

from __future__ import annotations

import bz2
import zlib

from qcowlib.errors import CorruptImage

__all__ = ["inflate_bzip2", "inflate_zlib"]


def inflate_zlib(data: bytes, size: int, what: str, offset: int) -> bytes:
    """The ``size`` bytes a zlib stream (RFC 1950) inflates to.

    Input after the end of the stream is ignored (as QEMU does).  Raises
    :class:`CorruptImage` naming ``what`` at ``offset`` for a stream that is damaged,
    incomplete, or does not inflate to exactly ``size`` bytes.
    """
    inflater = zlib.decompressobj()
    try:
        # max_length 0 would mean "no limit": ask for one byte more than declared.
        out = inflater.decompress(data, size + 1)
    except zlib.error as exc:
        raise CorruptImage(
            f"{what} is not a valid zlib stream ({exc})", structure=what, offset=offset
        ) from None
    _check(len(out), inflater.eof, size, what, offset)
    return out


def inflate_bzip2(data: bytes, size: int, what: str, offset: int) -> bytes:
    """The ``size`` bytes a bzip2 stream decompresses to (see :func:`inflate_zlib`)."""
    decompressor = bz2.BZ2Decompressor()
    try:
        out = decompressor.decompress(data, size + 1)
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptImage(
            f"{what} is not a valid bzip2 stream ({exc})", structure=what, offset=offset
        ) from None
    _check(len(out), decompressor.eof, size, what, offset)
    return out


def _check(got: int, ended: bool, size: int, what: str, offset: int) -> None:
    if got == size and ended:
        return
    if got > size:
        problem = f"inflates to more than the {size} bytes declared"
    elif ended:
        problem = f"inflates to {got} bytes, not the {size} declared"
    else:
        problem = "is truncated (the compressed stream does not end)"
    raise CorruptImage(f"{what} {problem}", structure=what, offset=offset)
