"""cloop V2.0 compressed loop images: header and block offsets.

Pure: :func:`parse_header` reads the block size and count from the first 136 bytes,
:func:`decode_offsets` checks the offsets table.  Nothing here opens a file.

Layout (the Linux ``cloop`` driver's V2.0 format; QEMU ``block/cloop.c``)::

    0x000  a shell script, starting with :data:`CLOOP_MAGIC` (the "#V2.0 Format" line
           is what QEMU's probe and this module recognise), padded to 128 bytes
    0x080  block_size  (u32, big-endian): uncompressed bytes per block
    0x084  n_blocks    (u32, big-endian)
    0x088  offsets     n_blocks + 1 file offsets (u64, big-endian); block ``i`` is the
                       zlib stream at ``[offsets[i], offsets[i + 1])``

The disk is ``n_blocks * block_size`` bytes.  Caps are QEMU's (``cloop_open``): a block
size that is a non-zero multiple of 512 and at most 64 MiB, an offsets table of at most
512 MiB, offsets that never decrease, compressed blocks of at most 128 MiB.  qcowlib
also refuses offsets past the end of the file (QEMU would read zeros there and fail the
read later), and a file without the V2.0 header even when the format is given (QEMU's
``cloop_open`` does not look at it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib.errors import CorruptImage, FormatError, TruncatedImage
from qcowlib.formats._record import FixedLayout

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]

__all__ = [
    "CLOOP_MAGIC",
    "HEADER",
    "MAX_BLOCK_SIZE",
    "MAX_OFFSETS_SIZE",
    "OFFSETS_AT",
    "CloopHeader",
    "decode_offsets",
    "is_cloop",
    "parse_header",
]

#: What QEMU's ``cloop_probe`` compares the start of the file with.
CLOOP_MAGIC: Final = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)
#: QEMU's MAX_BLOCK_SIZE: the largest uncompressed block.
MAX_BLOCK_SIZE: Final = 64 * 1024 * 1024
#: QEMU: a compressed block larger than twice the block size cap is corrupt.
MAX_COMPRESSED_SIZE: Final = 2 * MAX_BLOCK_SIZE
#: QEMU: at most 512 MB of offsets ("16 TB images at 256 KB block size").
MAX_OFFSETS_SIZE: Final = 512 * 1024 * 1024
HEADER: Final = FixedLayout("cloop header", ">", [("block_size", "I"), ("n_blocks", "I")])
HEADER_AT: Final = 128
OFFSETS_AT: Final = HEADER_AT + HEADER.sizeof()


class CloopHeader(NamedTuple):
    block_size: int
    n_blocks: int

    @property
    def virtual_size(self) -> int:
        return self.block_size * self.n_blocks

    @property
    def offsets_size(self) -> int:
        """Bytes of the offsets table (``n_blocks + 1`` entries)."""
        return (self.n_blocks + 1) * 8


def is_cloop(head: bytes | bytearray | memoryview) -> bool:
    """QEMU's ``cloop_probe`` (on its zero-padded 2 KiB buffer: the whole magic)."""
    return bytes(head[: len(CLOOP_MAGIC)]) == CLOOP_MAGIC


def parse_header(data: bytes | bytearray | memoryview, file_size: int) -> CloopHeader:
    """Block size and count from the file's first :data:`OFFSETS_AT` bytes, checked.

    Raises :class:`FormatError` without the magic, :class:`TruncatedImage` for a file
    too short for its header or offsets table, :class:`CorruptImage` for a block size or
    count outside QEMU's limits.
    """
    if not is_cloop(data):
        raise FormatError("Image not in cloop format", structure="cloop header", field="magic")
    rec = HEADER.parse(bytes(data[HEADER_AT:OFFSETS_AT]), HEADER_AT)
    h = CloopHeader(rec.block_size, rec.n_blocks)
    if h.block_size % 512:
        raise _bad(f"block_size {h.block_size} must be a multiple of 512", "block_size")
    if h.block_size == 0:
        raise _bad("block_size cannot be zero", "block_size")
    if h.block_size > MAX_BLOCK_SIZE:
        raise _bad(
            f"block_size {h.block_size} must be {MAX_BLOCK_SIZE >> 20} MB or less", "block_size"
        )
    if h.offsets_size > MAX_OFFSETS_SIZE:
        raise _bad("image requires too many offsets, try increasing block size", "n_blocks")
    if OFFSETS_AT + h.offsets_size > file_size:
        raise TruncatedImage(
            f"cloop offsets table ({h.n_blocks + 1} entries) is past the end of the file",
            structure="cloop offsets",
            offset=OFFSETS_AT,
        )
    return h


def _bad(message: str, name: str) -> CorruptImage:
    return CorruptImage(message, structure="cloop header", field=name, offset=HEADER_AT)


def decode_offsets(raw: bytes, header: CloopHeader, file_size: int) -> I64:
    """The offsets table as int64, checked as QEMU checks it, and against the file.

    Raises :class:`CorruptImage` naming the first entry that decreases, that makes a
    compressed block larger than 128 MiB, or that points past the end of the file.
    """
    import numpy as np

    n = header.n_blocks + 1
    if len(raw) < n * 8:
        raise TruncatedImage("cloop offsets table is truncated", structure="cloop offsets")
    offsets = np.frombuffer(raw, dtype=">u8", count=n)
    past = np.flatnonzero(offsets > np.uint64(file_size))
    if past.size:
        return _refuse(int(past[0]), "points past the end of the file")
    table = offsets.astype(np.int64)
    sizes = np.diff(table)
    bad = np.flatnonzero(sizes < 0)
    if bad.size:
        return _refuse(int(bad[0]) + 1, "offsets not monotonically increasing")
    big = np.flatnonzero(sizes > MAX_COMPRESSED_SIZE)
    if big.size:
        return _refuse(int(big[0]) + 1, "invalid compressed block size")
    return table


def _refuse(index: int, problem: str) -> I64:
    raise CorruptImage(
        f"{problem} at index {index}, image file is corrupt",
        structure="cloop offsets",
        offset=OFFSETS_AT + 8 * index,
    )
