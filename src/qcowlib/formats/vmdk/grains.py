"""VMDK grain directory and tables, stream markers and compressed grains (VDF 2.3, 4)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qcowlib.errors import (
    CorruptImage,
    TruncatedImage,
)
from qcowlib.formats._layout import parse_fixed as _parse
from qcowlib.formats.vmdk.header import (
    GRAIN_MARKER_HEAD,
    GTE_ZEROED,
    MARKER,
    MARKER_EOS,
    MARKER_FOOTER,
    SECTOR,
    SparseExtentHeader,
    decode_header,
    parse_header,
)

if TYPE_CHECKING:
    # numpy is imported where tables are decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    U32 = npt.NDArray[np.uint32]
    I64 = npt.NDArray[np.int64]


# ---------------------------------------------------------------------------------------
# grain directory and grain tables


def decode_table(
    raw: bytes | bytearray | memoryview, count: int, *, what: str = "grain table", offset: int = 0
) -> U32:
    """``count`` little-endian uint32 entries as a native ``uint32`` array (a copy).

    Raises :class:`TruncatedImage` when ``raw`` is shorter.
    """
    import numpy as np

    if count < 0 or len(raw) < count * 4:
        raise TruncatedImage(f"{what} is truncated", structure=what, offset=offset)
    return np.frombuffer(raw, dtype=np.dtype("<u4"), count=count).astype(np.uint32)


def encode_table(entries: U32, padded_to: int = SECTOR) -> bytes:
    """Native ``uint32`` entries to little-endian bytes, zero-padded to ``padded_to``."""
    import numpy as np

    raw = np.asarray(entries, dtype=np.uint32).astype(np.dtype("<u4")).tobytes()
    return raw + bytes(-len(raw) % padded_to)


def grain_table_offsets(gd: U32, h: SparseExtentHeader, file_size: int, gd_offset: int) -> I64:
    """File offsets of the grain tables the directory ``gd`` names, in directory order.

    Real grain tables are distinct and inside the file: more of them than the file can
    hold means a crafted directory, refused (:class:`CorruptImage`) before anything is
    read or allocated for them; a table past the end of the file is a
    :class:`TruncatedImage` naming its directory entry.
    """
    import numpy as np

    gt_bytes = h.gt_bytes
    allocated = np.flatnonzero(gd)
    if allocated.size * gt_bytes > file_size:
        raise CorruptImage(
            f"{allocated.size} grain tables cannot fit a file of {file_size} bytes",
            structure="vmdk grain directory",
            offset=gd_offset,
        )
    offsets = gd[allocated].astype(np.int64) * SECTOR
    bad = np.flatnonzero(offsets + gt_bytes > file_size)
    if bad.size:
        i = int(allocated[int(bad[0])])
        raise TruncatedImage(
            f"grain table {i} lies past the end of the file",
            structure="vmdk grain directory",
            field=f"entry[{i}]",
            offset=gd_offset + 4 * i,
        )
    return offsets


def check_grain_tables(gd: U32, tables: U32, h: SparseExtentHeader, file_size: int) -> None:
    """Refuse a grain inside the capacity whose grain table entry points past the file.

    ``tables`` holds the entries of the grain tables :func:`grain_table_offsets` names,
    in directory order.  Raises :class:`TruncatedImage` naming the first such grain.
    """
    import numpy as np

    gtes = h.num_gtes_per_gt
    first = np.flatnonzero(gd).astype(np.int64) * gtes
    grain = (first[:, None] + np.arange(gtes, dtype=np.int64)).ravel()
    value = tables[: grain.size].astype(np.int64)
    past = (value > GTE_ZEROED) & (grain < h.num_grains) & (value * SECTOR >= file_size)
    bad = np.flatnonzero(past)
    if bad.size:
        i = int(bad[0])
        g = int(grain[i])
        raise TruncatedImage(
            f"grain {g} (sector {int(value[i])}) lies past the end of the file",
            structure="vmdk grain table",
            field=f"entry[{g}]",
        )


# ---------------------------------------------------------------------------------------
# stream markers


@dataclass(frozen=True)
class Marker:
    """A metadata marker (VDF 4.4): ``val`` is the sectors of metadata that follow."""

    val: int
    size: int
    type: int
    pad: bytes = bytes(496)


def parse_marker(data: bytes | bytearray | memoryview, offset: int = 0) -> Marker:
    """A metadata marker from a sector.  Raises :class:`TruncatedImage`."""
    m = _parse(MARKER, data, "vmdk marker", offset)
    return Marker(m.val, m.size, m.type, m.pad)


def build_marker(marker_type: int, num_sectors: int = 0) -> bytes:
    """A metadata marker sector of ``marker_type`` announcing ``num_sectors``."""
    out: bytes = MARKER.build(
        {"val": num_sectors, "size": 0, "type": marker_type, "pad": bytes(496)}
    )
    return out


def parse_grain_marker(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """``(lba, size)`` of a grain marker head (12 bytes).  Raises :class:`TruncatedImage`."""
    m = _parse(GRAIN_MARKER_HEAD, data, "vmdk grain marker", offset)
    return int(m.lba), int(m.size)


def build_grain_marker(lba: int, payload: bytes) -> bytes:
    """A grain marker with its compressed ``payload``, zero-padded to whole sectors."""
    out: bytes = GRAIN_MARKER_HEAD.build({"lba": lba, "size": len(payload)}) + payload
    return out + bytes(-len(out) % SECTOR)


def parse_stream_footer(
    tail: bytes | bytearray | memoryview,
) -> tuple[Marker, SparseExtentHeader, Marker]:
    """The last 1536 bytes of a stream: footer marker, footer header, EOS marker.

    Decoded without judging values.  Raises :class:`TruncatedImage` when fewer bytes
    are given and :class:`FormatError` when the footer has a bad magic.
    """
    if len(tail) < 3 * SECTOR:
        raise TruncatedImage("VMDK stream footer is truncated", structure="vmdk footer")
    tail = tail[-3 * SECTOR :]
    marker = parse_marker(tail[:SECTOR])
    footer = decode_header(tail[SECTOR : 2 * SECTOR])
    eos = parse_marker(tail[2 * SECTOR :])
    return marker, footer, eos


def stream_footer_header(
    tail: bytes | bytearray | memoryview, file_size: int
) -> SparseExtentHeader:
    """The checked footer header from the last 1536 bytes of a ``file_size``-byte file.

    Checks what QEMU's ``vmdk_open_vmdk4`` checks (footer marker, magic, EOS marker) and
    then the header itself (:func:`parse_header`).  Raises :class:`TruncatedImage` or
    :class:`CorruptImage` with the file offset of the bad part.
    """
    base = file_size - 3 * SECTOR
    if base < 0 or len(tail) < 3 * SECTOR:
        raise TruncatedImage(
            "VMDK stream footer is missing (file too short)", structure="vmdk footer", offset=0
        )
    marker, _, eos = parse_stream_footer(tail)
    if marker.size != 0 or marker.type != MARKER_FOOTER:
        raise CorruptImage(
            "VMDK footer marker is invalid (truncated stream?)",
            structure="vmdk footer marker",
            offset=base,
        )
    if eos.val != 0 or eos.size != 0 or eos.type != MARKER_EOS:
        raise CorruptImage(
            "VMDK end-of-stream marker is invalid (truncated stream?)",
            structure="vmdk end-of-stream marker",
            offset=base + 2 * SECTOR,
        )
    return parse_header(tail[-2 * SECTOR :], file_size, offset=base + SECTOR, footer=True)


# ---------------------------------------------------------------------------------------
# compressed grains


def decompress_grain(data: bytes | memoryview, grain_bytes: int, *, offset: int = 0) -> bytes:
    """Inflate one grain (a zlib stream); never produces more than ``grain_bytes``.

    A stream shorter than a grain is zero-padded (the last grain of a disk whose size is
    not a whole number of grains may be written short).  Raises :class:`CorruptImage`.
    """
    try:
        d = zlib.decompressobj()
        out = d.decompress(data, grain_bytes)
    except zlib.error as exc:
        raise CorruptImage(
            f"invalid compressed grain: {exc}", structure="vmdk grain", offset=offset
        ) from None
    if len(out) < grain_bytes:
        out += bytes(grain_bytes - len(out))
    return out


def compress_grain(data: bytes | memoryview, level: int = zlib.Z_DEFAULT_COMPRESSION) -> bytes:
    """Deflate one grain into a zlib stream, as VMware and QEMU write it."""
    return zlib.compress(data, level)
