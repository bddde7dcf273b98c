"""Apple UDIF disk images (DMG): the koly trailer, mish blocks and the chunk table.

Pure: :func:`find_koly` locates the trailer in the file's last bytes,
:func:`parse_koly` checks it, :func:`decode_mish` turns one ``blkx`` resource (a "mish"
block) into chunk rows and :func:`build_table` checks and orders all of them.  Where the
mish blocks come from (the XML property list or the old binary resource fork) is
:mod:`qcowlib.formats.dmg.resources`.  Nothing here opens a file.

Layout (QEMU ``block/dmg.c``; Apple's UDIF ``UDIFResourceFile`` and ``BLKXTable``), all
integers big-endian.  The 512-byte trailer ("koly") ends the file::

    0x000 "koly", version (4), header size (512), flags, running data fork offset
    0x018 DataForkOffset   0x020 DataForkLength
    0x028 RsrcForkOffset   0x030 RsrcForkLength
    0x0d8 XMLOffset        0x0e0 XMLLength
    0x1ec SectorCount      (the disk is SectorCount * 512 bytes)

A mish block: "mish", version, the first sector it describes (u64 at 0x08), the
data offset its chunks are relative to (u64 at 0x18), then from 0xcc 40-byte chunks:
type (u32), comment (u32), sector number, sector count, compressed offset and
compressed length (u64 each).  QEMU derives the chunk count from the block's length
(``(len - 204) / 40``) and skips a block shorter than 244 bytes or without the magic.

Chunk types: zeros (0), raw (1), ignore (2, reads as zeros), ADC (0x80000004), zlib
(0x80000005), bzip2 (0x80000006), LZFSE (0x80000007), comment (0x7ffffffe) and last
entry (0xffffffff), which carry no sectors.  qcowlib reads zeros, ignore, raw, zlib and
bzip2 (stdlib :mod:`bz2`; QEMU needs its ``dmg-bz2`` module for those).  ADC and LZFSE
chunks are kept in the table and refused with :class:`UnsupportedFeature` when read
(QEMU 7.2 has no ADC decoder and reads LZFSE only with its ``dmg-lzfse`` module).  Other
types are dropped as QEMU drops them; a sector no chunk covers fails to read.

Caps are QEMU's (``dmg_read_mish_block``, ``dmg_read_plist_xml``): a chunk's compressed
length at most 64 MiB, the sector count of a chunk that is inflated or copied at most
64 MiB worth, an XML property list of at most 16 MiB.  qcowlib also refuses chunks whose
data lies past the end of the file and chunks that overlap; it orders chunks by sector
(QEMU's binary search assumes they are ordered).  Chunks that start at or past the end of
the disk are dropped (no read reaches them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib._units import MAX_VIRTUAL_SIZE
from qcowlib.errors import CorruptImage, FormatError
from qcowlib.formats._record import FixedLayout

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]
    U32 = npt.NDArray[np.uint32]

__all__ = [
    "CHUNK_NAMES",
    "DMG_LENGTHS_MAX",
    "DMG_SECTORCOUNTS_MAX",
    "KOLY",
    "KOLY_SIZE",
    "SECTOR",
    "ChunkTable",
    "Koly",
    "Mish",
    "build_table",
    "decode_mish",
    "find_koly",
    "is_dmg_trailer",
    "koly_window",
    "parse_koly",
]

SECTOR: Final = 512
KOLY_MAGIC: Final = b"koly"
KOLY_SIZE: Final = 512
#: QEMU: "the maximum length of a compressed chunk" (64 MB).
DMG_LENGTHS_MAX: Final = 64 * 1024 * 1024
DMG_SECTORCOUNTS_MAX: Final = DMG_LENGTHS_MAX // SECTOR
#: QEMU's cap on the XML property list ("A test sample had a XML length of about 1 MiB").
DMG_XML_MAX: Final = 16 * 1024 * 1024
#: qcowlib's cap on the binary resource fork (the same as the XML's).
DMG_RSRC_MAX: Final = DMG_XML_MAX

UDZE: Final = 0x00000000
UDRW: Final = 0x00000001
UDIG: Final = 0x00000002
UDCO: Final = 0x80000004
UDZO: Final = 0x80000005
UDBZ: Final = 0x80000006
ULFO: Final = 0x80000007
UDCM: Final = 0x7FFFFFFE
UDLE: Final = 0xFFFFFFFF
#: Chunk types that read as zeros without data.
ZERO_TYPES: Final = (UDZE, UDIG)
#: Chunk types qcowlib decodes from the file.
DATA_TYPES: Final = (UDRW, UDZO, UDBZ)
#: Chunk types kept in the table but refused when read.
REFUSED_TYPES: Final = (UDCO, ULFO)
CHUNK_NAMES: Final = {
    UDZE: "zero (UDZE)",
    UDRW: "raw (UDRW)",
    UDIG: "ignore (UDIG)",
    UDCO: "ADC (UDCO)",
    UDZO: "zlib (UDZO)",
    UDBZ: "bzip2 (UDBZ)",
    ULFO: "LZFSE (ULFO)",
}

KOLY: Final = FixedLayout(
    "dmg koly",
    ">",
    [
        ("signature", "4s"),
        ("version", "I"),
        ("header_size", "I"),
        ("flags", "I"),
        ("running_data_fork_offset", "Q"),
        ("data_fork_offset", "Q"),
        ("data_fork_length", "Q"),
        ("rsrc_fork_offset", "Q"),
        ("rsrc_fork_length", "Q"),
        ("segment_number", "I"),
        ("segment_count", "I"),
        ("segment_id", "16s"),
        ("data_checksum", "136s"),
        ("xml_offset", "Q"),
        ("xml_length", "Q"),
        ("reserved1", "120s"),
        ("master_checksum", "136s"),
        ("image_variant", "I"),
        ("sector_count", "Q"),
        ("reserved2", "12s"),
    ],
)
MISH_MAGIC: Final = b"mish"
MISH_HEAD: Final = FixedLayout(
    "dmg mish",
    ">",
    [("signature", "4s"), ("version", "I"), ("sector_number", "Q"), ("sector_count", "Q"),
     ("data_offset", "Q")],
)  # fmt: skip
MISH_CHUNKS_AT: Final = 204
MISH_CHUNK_SIZE: Final = 40
MISH_MIN: Final = MISH_CHUNKS_AT + MISH_CHUNK_SIZE
#: One chunk of a mish block.
CHUNK_DTYPE: Final = [
    ("type", ">u4"),
    ("comment", ">u4"),
    ("sector", ">u8"),
    ("count", ">u8"),
    ("offset", ">u8"),
    ("length", ">u8"),
]


def is_dmg_trailer(tail: bytes | bytearray | memoryview) -> bool:
    """Whether the last 512 bytes are a koly trailer (magic, version 4, size 512).

    QEMU's ``dmg_probe`` looks only at the file name (``*.dmg``); qcowlib never probes
    by name, so this is its content check.
    """
    if len(tail) < KOLY_SIZE:
        return False
    rec = KOLY.parse(bytes(tail[-KOLY_SIZE:]))
    return bool(rec.signature == KOLY_MAGIC and rec.version == 4 and rec.header_size == 512)


def koly_window(file_size: int) -> tuple[int, int]:
    """Where QEMU looks for "koly": the last 511 + 512 bytes (``dmg_find_koly_offset``)."""
    start = file_size - 511 - 512 if file_size > 511 + 512 else 0
    return start, min(file_size, 515)


def find_koly(window: bytes, start: int) -> int:
    """File offset of the first "koly" in ``window`` (read at ``start``), as QEMU finds it."""
    at = window.find(KOLY_MAGIC)
    if at < 0:
        raise FormatError("Could not locate UDIF trailer in dmg file", structure="dmg koly")
    return start + at


class Koly(NamedTuple):
    """The trailer fields QEMU uses."""

    offset: int
    data_fork_offset: int
    rsrc_fork_offset: int
    rsrc_fork_length: int
    xml_offset: int
    xml_length: int
    sector_count: int

    @property
    def virtual_size(self) -> int:
        return self.sector_count * SECTOR


def parse_koly(data: bytes, offset: int) -> Koly:
    """The trailer ``data`` found at file ``offset``, checked as ``dmg_open`` checks it.

    Raises :class:`CorruptImage` for forks or a property list that do not lie before
    the trailer, a disk larger than qcowlib's cap, or a trailer naming neither a
    resource fork nor a property list.
    """
    rec = KOLY.parse(data, offset)
    koly = Koly(
        offset,
        rec.data_fork_offset,
        rec.rsrc_fork_offset,
        rec.rsrc_fork_length,
        rec.xml_offset,
        rec.xml_length,
        rec.sector_count,
    )
    if koly.data_fork_offset > offset:
        raise _koly("the data fork starts after the trailer", "data_fork_offset", offset)
    if koly.rsrc_fork_offset >= offset or koly.rsrc_fork_length > offset - koly.rsrc_fork_offset:
        raise _koly("the resource fork does not lie before the trailer", "rsrc_fork", offset)
    if koly.xml_offset >= offset or koly.xml_length > offset - koly.xml_offset:
        raise _koly("the property list does not lie before the trailer", "xml", offset)
    if koly.virtual_size > MAX_VIRTUAL_SIZE:
        raise _koly(f"sector count {koly.sector_count} is too large", "sector_count", offset)
    if koly.rsrc_fork_length == 0 and koly.xml_length == 0:
        raise _koly("the trailer names no resource fork and no property list", "xml", offset)
    if koly.rsrc_fork_length == 0 and koly.xml_length > DMG_XML_MAX:
        raise _koly(f"the property list is larger than {DMG_XML_MAX} bytes", "xml", offset)
    if koly.rsrc_fork_length > DMG_RSRC_MAX:
        raise _koly(f"the resource fork is larger than {DMG_RSRC_MAX} bytes", "rsrc", offset)
    return koly


def _koly(message: str, name: str, offset: int) -> CorruptImage:
    return CorruptImage(message, structure="dmg koly", field=name, offset=offset)


class ChunkTable(NamedTuple):
    """All chunks, ordered by first sector: parallel arrays, one row per chunk.

    ``sector`` and ``sectors`` (the count) are in sectors of the disk (``sectors``
    cut at the disk's end); ``declared`` is the sector count the chunk decodes to; ``offset`` and
    ``length`` are the chunk's bytes in the file (absolute; -1 for chunks not read from
    the file).
    """

    type: U32
    sector: I64
    sectors: I64
    declared: I64
    offset: I64
    length: I64


class Mish(NamedTuple):
    """One mish block's chunks (``rows``, a structured big-endian array) and the
    sector and file offsets they are relative to."""

    number: int
    out_offset: int
    in_offset: int
    rows: npt.NDArray[np.void]


def decode_mish(block: bytes, index: int, data_fork_offset: int) -> Mish | None:
    """The chunks of mish block ``block`` (the ``index``-th), None when QEMU skips it
    (no "mish" magic or fewer than 244 bytes)."""
    import numpy as np

    if len(block) < MISH_MIN or block[:4] != MISH_MAGIC:
        return None
    head = MISH_HEAD.parse(block)
    n = (len(block) - MISH_CHUNKS_AT) // MISH_CHUNK_SIZE
    rows = np.frombuffer(block, dtype=np.dtype(CHUNK_DTYPE), count=n, offset=MISH_CHUNKS_AT)
    return Mish(index, head.sector_number, data_fork_offset + head.data_offset, rows)


def build_table(mishes: list[Mish], koly: Koly, file_size: int) -> ChunkTable:
    """The chunks of all mish blocks, checked (caps, data inside the file) and ordered.

    All blocks' chunks are checked together, as arrays.  Raises :class:`CorruptImage`
    naming the mish block and chunk at fault.
    """
    import numpy as np

    rows = _Rows.gather(mishes, file_size)
    rows.check_caps()
    rows = rows.inside(koly.sector_count)
    total = koly.sector_count
    sector = (rows.rows["sector"] + rows.out).astype(np.int64)
    count = np.minimum(rows.rows["count"], (total - sector).astype(np.uint64)).astype(np.int64)
    declared = np.where(rows.zero, count, rows.rows["count"].astype(np.int64))
    offset = rows.data_offsets(file_size)
    length = rows.rows["length"].astype(np.int64)
    used = np.flatnonzero(count > 0)
    pick = used[np.argsort(sector[used], kind="stable")]
    table = ChunkTable(
        rows.types[pick], sector[pick], count[pick], declared[pick], offset[pick], length[pick]
    )
    ends = table.sector + table.sectors
    overlap = np.flatnonzero(table.sector[1:] < ends[:-1])
    if overlap.size:
        at = int(table.sector[int(overlap[0]) + 1])
        raise CorruptImage(f"chunks overlap at sector {at}", structure="dmg chunk table")
    return table


class _Rows(NamedTuple):
    """Known-type chunks of all mish blocks, with each row's block offsets and where
    it came from (block and chunk index, for errors)."""

    rows: npt.NDArray[np.void]
    types: U32
    zero: npt.NDArray[np.bool_]
    #: The block's first sector, and its data offset (capped at file size + 1: any
    #: larger puts every data chunk of the block past the end), as uint64.
    out: npt.NDArray[np.uint64]
    base: npt.NDArray[np.uint64]
    mish: I64
    chunk: I64

    @classmethod
    def gather(cls, mishes: list[Mish], file_size: int) -> _Rows:
        import numpy as np

        lengths = [len(m.rows) for m in mishes]
        rows = (np.concatenate([m.rows for m in mishes]) if mishes
                else np.zeros(0, dtype=np.dtype(CHUNK_DTYPE)))  # fmt: skip
        out = np.repeat(np.array([m.out_offset for m in mishes], np.uint64), lengths)
        bases = [min(m.in_offset, file_size + 1) for m in mishes]
        base = np.repeat(np.array(bases, np.uint64), lengths)
        mish = np.repeat(np.array([m.number for m in mishes], np.int64), lengths)
        firsts = np.repeat(np.cumsum([0, *lengths])[:-1].astype(np.int64), lengths)
        chunk = np.arange(len(rows), dtype=np.int64) - firsts
        types = rows["type"].astype(np.uint32)
        keep = np.isin(types, (*ZERO_TYPES, *DATA_TYPES, *REFUSED_TYPES))
        return cls(rows[keep], types[keep], np.isin(types[keep], ZERO_TYPES), out[keep],
                   base[keep], mish[keep], chunk[keep])  # fmt: skip

    def check_caps(self) -> None:
        """QEMU's caps: sector counts of chunks that hold data, lengths of all."""
        import numpy as np

        counts, lengths = self.rows["count"], self.rows["length"]
        bad = np.flatnonzero(~self.zero & (counts > np.uint64(DMG_SECTORCOUNTS_MAX)))
        if bad.size:
            i = int(bad[0])
            raise self.error(i, f"sector count {int(counts[i])} is larger than max "
                             f"({DMG_SECTORCOUNTS_MAX})")  # fmt: skip
        bad = np.flatnonzero(lengths > np.uint64(DMG_LENGTHS_MAX))
        if bad.size:
            i = int(bad[0])
            raise self.error(i, f"length {int(lengths[i])} is larger than max "
                             f"({DMG_LENGTHS_MAX})")  # fmt: skip

    def inside(self, total: int) -> _Rows:
        """The rows whose chunk starts inside a disk of ``total`` sectors (only those
        can be read; their sectors fit int64 from here on)."""
        import numpy as np

        end = np.uint64(total)
        room = np.where(self.out < end, end - self.out, np.uint64(0))
        keep = self.rows["sector"] < room
        return _Rows(self.rows[keep], self.types[keep], self.zero[keep], self.out[keep],
                     self.base[keep], self.mish[keep], self.chunk[keep])  # fmt: skip

    def data_offsets(self, size: int) -> I64:
        """Absolute file offsets of data chunks (-1 for others), refusing data past the
        end of the file."""
        import numpy as np

        data = np.isin(self.types, DATA_TYPES)
        off = np.where(data, self.rows["offset"], np.uint64(0))
        length = self.rows["length"]
        within = self.base <= np.uint64(size)
        limit = np.where(within, np.uint64(size) - np.minimum(self.base, np.uint64(size)), 0)
        limit = limit.astype(np.uint64)
        fits = within & (off <= limit) & (length <= limit - np.minimum(off, limit))
        past = np.flatnonzero(data & ~fits)
        if past.size:
            raise self.error(int(past[0]), "data lies past the end of the file")
        absolute = np.where(data, (off + np.where(data, self.base, 0)).astype(np.int64), -1)
        return absolute.astype(np.int64)

    def error(self, i: int, problem: str) -> CorruptImage:
        return CorruptImage(
            f"mish block {int(self.mish[i])} chunk {int(self.chunk[i])}: {problem}",
            structure="dmg chunk table",
        )
