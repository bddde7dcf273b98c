"""A test-side builder of VHDX log entries (MS-VHDX 2.3.1), written from the spec apart
from qcowlib's log codec, and a way to put them into an image made by ``qemu-img``.

Entries are placed at byte positions of the circular log (a position near the end
wraps the entry around to the start), and the log GUID is set in both headers, as a
writer that stopped before replaying its log leaves them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcowlib.formats.vhdx.spec import crc32c

SECTOR = 4096
MIB = 1 << 20
HEADER_OFFSETS = (64 * 1024, 128 * 1024)
LOG_GUID = bytes.fromhex("0d9d3b3c7a1e4b8c9a4b5c3d2e1f0a9b")


@dataclass(frozen=True)
class Data:
    """A data descriptor: write ``sector`` (4 KiB) at ``offset``."""

    offset: int
    sector: bytes


@dataclass(frozen=True)
class Zero:
    """A zero descriptor: zero ``length`` bytes at ``offset``."""

    offset: int
    length: int


def entry(
    seq: int,
    descriptors: list[Data | Zero],
    *,
    flushed: int,
    last: int,
    guid: bytes = LOG_GUID,
    tail: int = 0,
    pad: int = 0,
    bad_crc: bool = False,
    entry_length: int | None = None,
    count: int | None = None,
    desc_seq: int | None = None,
) -> bytes:
    """One log entry: header and descriptors, then a data sector per data descriptor,
    then ``pad`` empty sectors.  The other keywords make it wrong on purpose."""
    n_desc = -(-(len(descriptors) + 2) // 128)
    datas = [d for d in descriptors if isinstance(d, Data)]
    total = (n_desc + len(datas) + pad) * SECTOR
    length = total if entry_length is None else entry_length
    n = len(descriptors) if count is None else count
    head = struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, tail, seq, n, 0, guid, flushed, last)
    body = bytearray(head)
    dseq = seq if desc_seq is None else desc_seq
    for d in descriptors:
        if isinstance(d, Data):
            lead = struct.unpack_from("<Q", d.sector)[0]
            trail = struct.unpack_from("<I", d.sector, 4092)[0]
            body += struct.pack("<4sIQQQ", b"desc", trail, lead, d.offset, dseq)
        else:
            body += struct.pack("<4sIQQQ", b"zero", 0, d.length, d.offset, dseq)
    body = body.ljust(n_desc * SECTOR, b"\0")
    for d in datas:
        body += struct.pack("<4sI", b"data", seq >> 32) + d.sector[8:4092]
        body += struct.pack("<I", seq & 0xFFFFFFFF)
    body = body.ljust(total, b"\0")
    crc = crc32c(bytes(body))
    if bad_crc:
        crc ^= 1
    body[4:8] = struct.pack("<I", crc)
    return bytes(body)


def header_fields(path: Path) -> list[tuple[Any, ...]]:
    """Both headers' fields as the spec lays them out: signature, checksum, sequence
    number, file write, data write and log GUIDs, log version, version, log length and
    log offset."""
    data = path.read_bytes()
    return [struct.unpack_from("<4sIQ16s16s16sHHIQ", data, at) for at in HEADER_OFFSETS]


def log_region(path: Path) -> tuple[int, int]:
    """The current header's ``(log_offset, log_length)``."""
    fields = max(header_fields(path), key=lambda h: h[2])
    return fields[9], fields[8]


def set_log_guid(path: Path, guid: bytes = LOG_GUID) -> None:
    """Write ``guid`` as the log GUID of both headers, with their checksums."""
    with path.open("r+b") as f:
        for at in HEADER_OFFSETS:
            f.seek(at)
            block = bytearray(f.read(SECTOR))
            block[48:64] = guid
            block[4:8] = bytes(4)
            block[4:8] = struct.pack("<I", crc32c(bytes(block)))
            f.seek(at)
            f.write(block)


def make_dirty(path: Path, placed: list[tuple[int, bytes]], guid: bytes = LOG_GUID) -> None:
    """Put each ``(position, entry)`` into the circular log (wrapping at its end) and
    name the log in the headers."""
    offset, length = log_region(path)
    with path.open("r+b") as f:
        f.seek(offset)
        ring = bytearray(f.read(length).ljust(length, b"\0"))
        for pos, raw in placed:
            for i in range(0, len(raw), SECTOR):
                at = (pos + i) % length
                ring[at : at + SECTOR] = raw[i : i + SECTOR]
        f.seek(offset)
        f.write(ring)
    set_log_guid(path, guid)


def sector(fill: int, tag: bytes = b"") -> bytes:
    """A 4 KiB sector of ``fill`` bytes, with ``tag`` at its start and end (so the
    leading and trailing bytes kept in the descriptor are not all the same)."""
    body = bytearray([fill]) * SECTOR
    body[: len(tag)] = tag
    body[SECTOR - len(tag) :] = tag
    return bytes(body)
