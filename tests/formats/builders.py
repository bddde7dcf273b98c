"""Builders of bochs, cloop and DMG images for tests (qemu-img cannot create them).

Each builder takes a guest disk (``bytes``, a whole number of sectors) and a small spec,
and returns the image file's bytes.  They are written from the formats' descriptions
(Bochs ``redolog_header_t``, the cloop V2.0 layout, Apple's UDIF trailer and BLKX
table), independently of qcowlib's readers, and qemu-img is the judge of what they make:
the tests check qemu-img reads each image back as the disk it was built from.
"""

from __future__ import annotations

import bz2
import plistlib
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

SECTOR = 512

# --- bochs ------------------------------------------------------------------------------


@dataclass
class BochsSpec:
    """A Bochs growing image: extent and bitmap sizes, header version, and which
    sectors are stored (``written``: None stores every non-zero sector; a set of sector
    numbers stores exactly those, zeros included)."""

    extent: int = 4096
    bitmap: int = 512
    version: int = 2
    written: set[int] | None = None
    extra_catalog: int = 0
    seed: int = 0


def build_bochs(disk: bytes, spec: BochsSpec) -> bytes:
    """A Bochs image of ``disk``; extents are stored in a shuffled order."""
    assert len(disk) % SECTOR == 0
    per_extent = spec.extent // SECTOR
    n_sectors = len(disk) // SECTOR
    n_extents = -(-n_sectors // per_extent)
    catalog_n = n_extents + spec.extra_catalog
    written = spec.written
    if written is None:
        written = {s for s in range(n_sectors) if disk[s * SECTOR : (s + 1) * SECTOR].strip(b"\0")}
    used = sorted({s // per_extent for s in written})
    order = used[:]
    random.Random(spec.seed).shuffle(order)
    catalog = [0xFFFFFFFF] * catalog_n
    for slot, ext in enumerate(order):
        catalog[ext] = slot
    bitmap_blocks = -(-spec.bitmap // SECTOR)
    header = bytearray(SECTOR)
    header[0:32] = b"Bochs Virtual HD Image".ljust(32, b"\0")
    header[32:48] = b"Redolog".ljust(16, b"\0")
    header[48:64] = b"Growing".ljust(16, b"\0")
    version = 0x00020000 if spec.version == 2 else 0x00010000
    struct.pack_into("<IIIII", header, 64, version, SECTOR, catalog_n, spec.bitmap, spec.extent)
    if spec.version == 2:
        struct.pack_into("<IQ", header, 84, 0, len(disk))
    else:
        struct.pack_into("<Q", header, 84, len(disk))
    out = bytearray(header) + struct.pack(f"<{catalog_n}I", *catalog)
    for ext in order:
        bits = bytearray(bitmap_blocks * SECTOR)
        data = bytearray(spec.extent)
        for k in range(per_extent):
            s = ext * per_extent + k
            if s in written and s < n_sectors:
                bits[k // 8] |= 1 << (k % 8)
                data[k * SECTOR : (k + 1) * SECTOR] = disk[s * SECTOR : (s + 1) * SECTOR]
            else:
                # Unwritten sectors hold junk: readers must not show it.
                data[k * SECTOR : (k + 1) * SECTOR] = b"\xee" * SECTOR
        out += bits + data
    return bytes(out)


def bochs_expected(disk: bytes, spec: BochsSpec) -> bytes:
    """What a Bochs image built from ``disk`` reads as (unwritten sectors are zeros)."""
    if spec.written is None:
        return disk
    out = bytearray(len(disk))
    for s in spec.written:
        out[s * SECTOR : (s + 1) * SECTOR] = disk[s * SECTOR : (s + 1) * SECTOR]
    return bytes(out)


# --- cloop ------------------------------------------------------------------------------

CLOOP_MAGIC = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


def build_cloop(disk: bytes, block_size: int = 65536, level: int = 6) -> bytes:
    """A cloop V2.0 image of ``disk`` (its size a multiple of ``block_size``)."""
    assert len(disk) % block_size == 0
    n = len(disk) // block_size
    blocks = [zlib.compress(disk[i * block_size : (i + 1) * block_size], level) for i in range(n)]
    offsets = [136 + 8 * (n + 1)]
    for b in blocks:
        offsets.append(offsets[-1] + len(b))
    head = CLOOP_MAGIC.ljust(128, b"\0") + struct.pack(">II", block_size, n)
    return head + struct.pack(f">{n + 1}Q", *offsets) + b"".join(blocks)


# --- dmg --------------------------------------------------------------------------------

UDZE, UDRW, UDIG = 0, 1, 2
UDCO, UDZO, UDBZ, ULFO = 0x80000004, 0x80000005, 0x80000006, 0x80000007
UDCM, UDLE = 0x7FFFFFFE, 0xFFFFFFFF
KINDS = {"zero": UDZE, "raw": UDRW, "ignore": UDIG, "adc": UDCO, "zlib": UDZO,
         "bzip2": UDBZ, "lzfse": ULFO, "comment": UDCM}  # fmt: skip


@dataclass
class DmgSpec:
    """A DMG: its partitions (mish blocks), each a list of ``(kind, sectors)`` chunks in
    disk order; ``rsrc`` stores the mish blocks in a binary resource fork instead of
    the XML property list."""

    partitions: list[list[tuple[str, int]]] = field(default_factory=list)
    rsrc: bool = False
    relative_data: bool = True


def build_dmg(disk: bytes, spec: DmgSpec) -> bytes:
    """A UDIF image of ``disk`` laid out as ``spec`` says (zero and ignore chunks must
    cover zero sectors of ``disk``; see :func:`dmg_expected`)."""
    fork = bytearray()
    mishes = []
    sector = 0
    for part in spec.partitions:
        first = sector
        part_data_at = len(fork) if spec.relative_data else 0
        chunks = []
        for kind, count in part:
            data = disk[sector * SECTOR : (sector + count) * SECTOR]
            payload = _chunk_payload(kind, data)
            rel = sector - first
            chunks.append((KINDS[kind], rel, count, len(fork) - part_data_at, len(payload)))
            fork += payload
            if kind != "comment":
                sector += count
        chunks.append((UDLE, sector - first, 0, len(fork) - part_data_at, 0))
        mishes.append(mish_block(first, sector - first, part_data_at, chunks))
    return assemble_dmg(bytes(fork), mishes, len(disk) // SECTOR, rsrc=spec.rsrc)


def assemble_dmg(fork: bytes, mishes: list[bytes], sectors: int, *, rsrc: bool = False) -> bytes:
    """A DMG file: data fork ``fork``, then the mish blocks in a property list (or a
    resource fork), then the koly trailer for a disk of ``sectors`` sectors."""
    if rsrc:
        res = _rsrc(mishes)
        return fork + res + _koly(sectors, (len(fork), len(res)), (0, 0))
    xml = _plist(mishes)
    return fork + xml + _koly(sectors, (0, 0), (len(fork), len(xml)))


def dmg_expected(disk: bytes, spec: DmgSpec) -> bytes:
    """What the DMG built from ``disk`` reads as: zero/ignore chunks as zeros."""
    out = bytearray(disk)
    sector = 0
    for part in spec.partitions:
        for kind, count in part:
            if kind == "comment":
                continue
            if kind in ("zero", "ignore"):
                out[sector * SECTOR : (sector + count) * SECTOR] = bytes(count * SECTOR)
            sector += count
    return bytes(out)


def _chunk_payload(kind: str, data: bytes) -> bytes:
    if kind == "raw":
        return data
    if kind == "zlib":
        return zlib.compress(data)
    if kind == "bzip2":
        return bz2.compress(data)
    if kind in ("adc", "lzfse"):
        return b"\x00unsupported codec payload\x00" * 2
    return b""


def mish_block(
    first: int, count: int, data_at: int, chunks: list[tuple[int, int, int, int, int]]
) -> bytes:
    head = bytearray(204)
    struct.pack_into(">4sIQQQII", head, 0, b"mish", 1, first, count, data_at, 0, len(chunks))
    struct.pack_into(">II", head, 64, 2, 32)  # checksum type CRC32, 32 bits (left zero)
    struct.pack_into(">I", head, 200, len(chunks))
    body = b"".join(struct.pack(">IIQQQQ", t, 0, s, c, o, n) for t, s, c, o, n in chunks)
    return bytes(head) + body


def _plist(mishes: list[bytes]) -> bytes:
    blkx = [
        {
            "Attributes": "0x0050",
            "CFName": f"part {i}",
            "Data": m,
            "ID": str(i - 1),
            "Name": f"part {i}",
        }
        for i, m in enumerate(mishes)
    ]
    return plistlib.dumps({"resource-fork": {"blkx": blkx}}, fmt=plistlib.FMT_XML)


def _rsrc(mishes: list[bytes]) -> bytes:
    data = b"".join(struct.pack(">I", len(m)) + m for m in mishes)
    head = struct.pack(">IIII", 256, 256 + len(data), len(data), 0).ljust(256, b"\0")
    return head + data


def _koly(sectors: int, rsrc: tuple[int, int], xml: tuple[int, int]) -> bytes:
    k = bytearray(512)
    struct.pack_into(">4sIII", k, 0, b"koly", 4, 512, 1)
    data_len = rsrc[0] if rsrc[1] else xml[0]
    struct.pack_into(">QQQQQ", k, 0x10, 0, 0, data_len, rsrc[0], rsrc[1])
    struct.pack_into(">II", k, 0x38, 1, 1)
    struct.pack_into(">QQ", k, 0xD8, xml[0], xml[1])
    struct.pack_into(">IQ", k, 0x1E8, 1, sectors)
    return bytes(k)


def patterned_disk(sectors: int, seed: int, zero_runs: Sequence[tuple[int, int]] = ()) -> bytes:
    """A disk of ``sectors`` sectors: random runs of bytes, zero where ``zero_runs``
    (``(first, count)`` in sectors) say, and some zero sectors scattered about."""
    rng = random.Random(seed)
    out = bytearray()
    for _s in range(sectors):
        if rng.random() < 0.2:
            out += bytes(SECTOR)
        else:
            out += bytes([rng.randrange(256)]) * 256 + rng.randbytes(256)
    for first, count in zero_runs:
        out[first * SECTOR : (first + count) * SECTOR] = bytes(count * SECTOR)
    return bytes(out)
