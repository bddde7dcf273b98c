"""The VHDX log (MS-VHDX 2.3): entries, descriptors, the active sequence, a replay plan.

Pure: bytes of the log region in, values and a list of file writes out.  Which entries
count and how they are replayed follows QEMU 7.2 (``block/vhdx-log.c``), because
``qemu-img`` is the reference qcowlib answers to, including where QEMU departs from the
letter of the specification:

* the log is scanned from its start, one 4 KiB sector at a time, for entries whose
  header is sound (``loge`` signature, length a multiple of 4 KiB and at most the log,
  sequence number non-zero, the header's log GUID, descriptors that fit) and whose
  CRC-32C over the whole entry, checksum field taken as zero, is right; the entry's
  ``tail`` field is not used;
* a sequence is a run of such entries one after the other in the circular log, each
  numbered one more than the one before (the second entry of a run is not compared
  with the first, as in QEMU); the active sequence is the run whose *first* entry has
  the highest sequence number (so of a sequence that wraps around the end of the log,
  the scan meets the part after the wrap first, and only that part is replayed);
* a descriptor that is not sound in an entry whose header is sound fails the whole
  search (QEMU then refuses to open the image at all);
* replaying reads the entries one after the other (a padded entry is not skipped),
  writes each data descriptor's sector and each zero descriptor's range, and sets the
  file's length to ``last_file_offset`` rounded up to 1 MiB where the file was shorter
  than that offset before the entry's writes and the offset is not already a multiple
  of 1 MiB (QEMU compares with the length it read before the writes, so this can cut
  off a write of the same entry; QEMU leaves a file shorter than a 1 MiB-aligned
  ``last_file_offset`` as it is).

What qemu-img would do without limit is refused here with :class:`CorruptImage`
(:class:`UnsupportedFeature` for :data:`MAX_LOG_LENGTH`): a log longer than
:data:`MAX_LOG_LENGTH`; a log whose scan comes back to the entry it started from
(QEMU's scan never ends: an entry as long as the log with a wrong checksum, a sequence
that with the sector after it fills the log); a scan that would checksum more than
:data:`CHECKSUM_BUDGET` times the log (overlapping long entries: QEMU spends minutes);
writes that reach into the file identifier and headers (:data:`PROTECTED_END`) or into
the log itself, or end more than :data:`MAX_REPLAY_GROWTH` past the end of the file;
zero descriptors that together zero more than the file plus that growth.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from qcowlib.errors import CorruptImage, TruncatedImage, UnsupportedFeature
from qcowlib.formats.vhdx.spec import MIB, crc32c

__all__ = [
    "LOG_SECTOR",
    "MAX_LOG_LENGTH",
    "MAX_REPLAY_GROWTH",
    "PROTECTED_END",
    "LogDescriptor",
    "LogEntryHeader",
    "LogSequence",
    "ReplayPlan",
    "Write",
    "check_log_fields",
    "descriptor_sectors",
    "entry_checksum",
    "find_active_sequence",
    "parse_data_sector",
    "parse_descriptor",
    "parse_entry_header",
    "plan_replay",
]

#: Log sectors, entries and data sectors are 4 KiB (spec 2.3.1).
LOG_SECTOR: Final = 4096
LOG_ENTRY_HEADER_SIZE: Final = 64
LOG_DESCRIPTOR_SIZE: Final = 32
LOG_SIGNATURE: Final = b"loge"
DESC_SIGNATURE: Final = b"desc"
ZERO_SIGNATURE: Final = b"zero"
DATA_SIGNATURE: Final = b"data"
#: Longest log read: Hyper-V and qemu-img make 1 MiB logs; the search reads the whole
#: log into memory and computes CRC-32C over its entries in Python (about 15 MB/s).
MAX_LOG_LENGTH: Final = 8 * MIB
#: The search checksums at most this many times the log's length.  A log as Hyper-V or
#: QEMU writes it is checksummed about once (each entry in its sequence, then the scan
#: goes on after it); a hostile log of long, overlapping entries could make QEMU's scan
#: checksum the whole log once per sector (thousands of times; minutes): refused.
CHECKSUM_BUDGET: Final = 4
#: How far past the end of the file a replay may write or extend it (QEMU: no limit;
#: a new payload block is at most 256 MiB, and a hostile log could ask for exabytes).
MAX_REPLAY_GROWTH: Final = 1 << 30
#: The file identifier and both headers, never written by a log (they are updated by
#: the two-header protocol of spec 2.2.2.1, never through the log).
PROTECTED_END: Final = 192 * 1024
_INT64_MAX: Final = (1 << 63) - 1
_U64: Final = (1 << 64) - 1

# signature, checksum, entry_length, tail, sequence_number, descriptor_count, reserved,
# log_guid, flushed_file_offset, last_file_offset (spec 2.3.1.1, QEMU VHDXLogEntryHeader)
_ENTRY_HEADER: Final = struct.Struct("<4sIIIQII16sQQ")
# signature, trailing_bytes | reserved, leading_bytes | zero_length, file_offset,
# sequence_number (spec 2.3.1.2-3, QEMU VHDXLogDescriptor)
_DESCRIPTOR: Final = struct.Struct("<4sIQQQ")
# data_signature, sequence_high, data, sequence_low (spec 2.3.1.4, VHDXLogDataSector)
_DATA_SECTOR: Final = struct.Struct("<4sI4084sI")


@dataclass(frozen=True)
class LogEntryHeader:
    """A log entry header (spec 2.3.1.1)."""

    signature: bytes
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int


@dataclass(frozen=True)
class LogDescriptor:
    """A data (``desc``) or zero (``zero``) descriptor (spec 2.3.1.2, 2.3.1.3)."""

    signature: bytes
    trailing_bytes: int  # the zero descriptor's reserved field
    leading_bytes: int  # the zero descriptor's zero_length
    file_offset: int
    sequence_number: int

    @property
    def is_zero(self) -> bool:
        return self.signature == ZERO_SIGNATURE

    @property
    def zero_length(self) -> int:
        return self.leading_bytes


@dataclass(frozen=True)
class LogSequence:
    """The active sequence: log offsets ``[start, end)`` (end may wrap), entry count and
    the first entry's header."""

    start: int
    end: int
    count: int
    first: LogEntryHeader


@dataclass(frozen=True)
class Write:
    """Write ``data`` at ``offset`` (zeros of ``length`` bytes when ``data`` is None)."""

    offset: int
    length: int
    data: bytes | None = None


@dataclass(frozen=True)
class ReplayPlan:
    """What replaying a sequence does to the file: ``steps`` in order (a :class:`Write`,
    or an ``int``: set the file's length to it) and the file's length at the end."""

    steps: tuple[Write | int, ...]
    final_size: int


def parse_entry_header(data: bytes | memoryview, offset: int = 0) -> LogEntryHeader:
    """The 64-byte entry header at the start of ``data`` (found at file ``offset``).

    Raises :class:`TruncatedImage` for short data; the fields are not judged here.
    """
    if len(data) < LOG_ENTRY_HEADER_SIZE:
        raise TruncatedImage(
            f"vhdx log entry header is truncated ({len(data)} of 64 bytes)",
            structure="vhdx log entry",
            offset=offset,
        )
    f = _ENTRY_HEADER.unpack_from(data)
    return LogEntryHeader(f[0], f[1], f[2], f[3], f[4], f[5], f[7], f[8], f[9])


def parse_descriptor(data: bytes | memoryview, offset: int = 0) -> LogDescriptor:
    """The 32-byte descriptor at the start of ``data``; :class:`TruncatedImage` if short."""
    if len(data) < LOG_DESCRIPTOR_SIZE:
        raise TruncatedImage(
            f"vhdx log descriptor is truncated ({len(data)} of 32 bytes)",
            structure="vhdx log descriptor",
            offset=offset,
        )
    return LogDescriptor(*_DESCRIPTOR.unpack_from(data))


def parse_data_sector(data: bytes | memoryview, offset: int = 0) -> tuple[int, bytes]:
    """A 4 KiB data sector: its sequence number and its 4084 bytes of data.

    Raises :class:`TruncatedImage` for short data (the signature is not judged: QEMU
    does not look at it).
    """
    if len(data) < LOG_SECTOR:
        raise TruncatedImage(
            f"vhdx log data sector is truncated ({len(data)} of {LOG_SECTOR} bytes)",
            structure="vhdx log data sector",
            offset=offset,
        )
    _sig, high, payload, low = _DATA_SECTOR.unpack_from(data)
    return (high << 32) | low, payload


def descriptor_sectors(count: int) -> int:
    """Sectors holding the entry header and ``count`` descriptors (128 per sector)."""
    return -(-(count + 2) // 128)


def entry_checksum(raw: bytes | memoryview) -> int:
    """CRC-32C of a whole entry with its checksum field (bytes 4-7) taken as zero."""
    return crc32c(bytes(raw[:4]) + bytes(4) + bytes(raw[8:]))


def check_log_fields(
    log_offset: int, log_length: int, log_version: int, at: int, *, present: bool
) -> None:
    """The header's log fields as QEMU's ``vhdx_parse_log`` requires them.

    ``at`` is the header's file offset; ``present`` says the header names a log (a
    non-zero log GUID and length), whose length is then checked too.  Raises
    :class:`CorruptImage` for a log offset below 1 MiB or not a multiple of it, a log
    version other than 0 or (``present``) a log length not a multiple of 1 MiB, and
    :class:`UnsupportedFeature` for a log longer than :data:`MAX_LOG_LENGTH`.
    """
    if log_offset < MIB or log_offset % MIB:
        raise CorruptImage(
            f"VHDX log offset {log_offset} is not a multiple of 1 MiB past the headers",
            structure="vhdx header",
            field="log_offset",
            offset=at + 72,
        )
    if log_version != 0:
        raise CorruptImage(
            f"VHDX log version {log_version} is not 0",
            structure="vhdx header",
            field="log_version",
            offset=at + 64,
        )
    if present and log_length % MIB:
        raise CorruptImage(
            f"VHDX log length {log_length} is not a multiple of 1 MiB",
            structure="vhdx header",
            field="log_length",
            offset=at + 68,
        )
    if present and log_length > MAX_LOG_LENGTH:
        raise UnsupportedFeature(
            f"VHDX log of {log_length} bytes is longer than qcowlib reads ({MAX_LOG_LENGTH} bytes)",
            structure="vhdx header",
            field="log_length",
            offset=at + 68,
        )


class _Ring:
    """The log region as QEMU walks it: 4 KiB sectors, wrapping at its end."""

    def __init__(self, log: bytes, log_guid: bytes, base: int) -> None:
        if not log or len(log) % LOG_SECTOR:
            raise CorruptImage(
                f"VHDX log length {len(log)} is not a positive multiple of {LOG_SECTOR}",
                structure="vhdx log",
                offset=base,
            )
        self.log = memoryview(log)
        self.length = len(log)
        self.guid = log_guid
        self.base = base
        #: Bytes the scan may still checksum (see :data:`CHECKSUM_BUDGET`).
        self.budget = CHECKSUM_BUDGET * self.length

    def spend(self, nbytes: int, index: int) -> None:
        """Account for checksumming ``nbytes`` of the entry at ``index``."""
        self.budget -= nbytes
        if self.budget < 0:
            raise CorruptImage(
                f"VHDX log scan would checksum more than {CHECKSUM_BUDGET} times the log's "
                "length: its entries overlap as no log written by Hyper-V or QEMU does",
                structure="vhdx log",
                offset=self.base + index,
            )

    def inc(self, index: int, sectors: int = 1) -> int:
        """``index`` moved on by ``sectors`` (QEMU's ``vhdx_log_inc_idx``, repeated)."""
        return (index + sectors * LOG_SECTOR) % self.length

    def available(self, index: int, end: int) -> int:
        """Sectors that can be read from ``index`` before reaching ``end``."""
        return ((end - index) % self.length) // LOG_SECTOR

    def sectors(self, index: int, count: int) -> bytes:
        """``count`` sectors from ``index`` on, wrapping at the end of the log."""
        whole, rest = divmod(count, self.length // LOG_SECTOR)
        out = [bytes(self.log[index:]), bytes(self.log[:index])] * whole if whole else []
        take = rest * LOG_SECTOR
        first = self.log[index : index + take]
        out += [bytes(first), bytes(self.log[: take - len(first)])]
        return b"".join(out)

    def header_ok(self, h: LogEntryHeader) -> bool:
        """QEMU's ``vhdx_log_hdr_is_valid``."""
        return (
            h.signature == LOG_SIGNATURE
            and h.entry_length <= self.length
            and h.entry_length % LOG_SECTOR == 0
            and h.sequence_number != 0
            and h.log_guid == self.guid
            and h.descriptor_count * LOG_DESCRIPTOR_SIZE <= h.entry_length
        )

    def descriptors(self, index: int, h: LogEntryHeader) -> tuple[bytes, list[LogDescriptor]]:
        """The descriptor sectors of the entry at ``index`` and its descriptors, each
        checked as ``vhdx_log_desc_is_valid`` (:class:`CorruptImage` otherwise)."""
        raw = self.sectors(index, descriptor_sectors(h.descriptor_count))
        end = LOG_ENTRY_HEADER_SIZE + LOG_DESCRIPTOR_SIZE * h.descriptor_count
        area = memoryview(raw)[LOG_ENTRY_HEADER_SIZE:end]  # inside raw: see header_ok
        found = [LogDescriptor(*f) for f in _DESCRIPTOR.iter_unpack(area)]
        for i, d in enumerate(found):
            if not _descriptor_ok(d, h):
                raise CorruptImage(
                    f"VHDX log entry {h.sequence_number} has an invalid descriptor {i} "
                    f"({d.signature!r}, file offset {d.file_offset})",
                    structure="vhdx log descriptor",
                    offset=self.base + (index + 64 + 32 * i) % self.length,
                )
        return raw, found


def _descriptor_ok(d: LogDescriptor, h: LogEntryHeader) -> bool:
    if d.sequence_number != h.sequence_number or d.file_offset % LOG_SECTOR:
        return False
    if d.signature == ZERO_SIGNATURE:
        return d.zero_length % LOG_SECTOR == 0
    return d.signature == DESC_SIGNATURE


def _validate_entry(ring: _Ring, index: int, seq: int) -> tuple[LogEntryHeader | None, int]:
    """QEMU's ``vhdx_validate_log_entry``: the entry at ``index`` if valid (numbered
    ``seq + 1`` when ``seq``), and where the scan goes on."""
    h = parse_entry_header(ring.sectors(index, 1))
    if not ring.header_ok(h) or (seq and h.sequence_number != seq + 1):
        return None, ring.inc(index)
    head, _ = ring.descriptors(index, h)
    n_desc = descriptor_sectors(h.descriptor_count)
    total = h.entry_length // LOG_SECTOR
    rest = ring.sectors(ring.inc(index, n_desc), total - n_desc) if total > n_desc else b""
    after = ring.inc(index, max(total, n_desc))
    ring.spend(len(head) + len(rest), index)
    return (h if entry_checksum(head + rest) == h.checksum else None), after


def find_active_sequence(log: bytes, log_guid: bytes, base: int = 0) -> LogSequence | None:
    """The active sequence of the log region ``log`` (found at file offset ``base``) for
    the header's ``log_guid``, or None when the log holds no valid entry (QEMU's
    ``vhdx_log_search``).

    Raises :class:`CorruptImage` for an unsound descriptor in an entry with a sound
    header (QEMU refuses the image) and for a log QEMU's scan would never finish.
    """
    ring = _Ring(log, log_guid, base)
    limit = ring.length // LOG_SECTOR + 2
    best: LogSequence | None = None
    index = 0
    for _ in range(limit):
        tail = index
        first, index = _validate_entry(ring, index, 0)
        if first is not None:
            end, count, seq = index, 1, 0
            while True:
                nxt, index = _validate_entry(ring, index, seq)
                if nxt is None:
                    break
                end, count, seq = index, count + 1, nxt.sequence_number
                if count > limit:
                    raise _endless(ring, tail)
            if best is None or first.sequence_number > best.first.sequence_number:
                best = LogSequence(tail, end, count, first)
        if index < tail:
            return best
        if index == tail:
            raise _endless(ring, tail)
    raise _endless(ring, index)  # pragma: no cover - the scan moves on every round


def _endless(ring: _Ring, index: int) -> CorruptImage:
    return CorruptImage(
        "VHDX log scan comes back to the entry it started from without ending "
        "(QEMU would search this log forever)",
        structure="vhdx log entry",
        offset=ring.base + index,
    )


def _fail(message: str, ring: _Ring, index: int) -> CorruptImage:
    return CorruptImage(
        f"VHDX log cannot be replayed: {message}",
        structure="vhdx log entry",
        offset=ring.base + index,
    )


class _Planner:
    """QEMU's ``vhdx_log_flush`` run on paper: the writes and resizes, checked."""

    def __init__(self, ring: _Ring, seq: LogSequence, file_size: int) -> None:
        self.ring = ring
        self.read, self.end = seq.start, seq.end
        self.size = file_size
        self.limit = file_size + MAX_REPLAY_GROWTH
        self.zeroed = 0
        self.steps: list[Write | int] = []

    def entry(self) -> None:
        ring, at = self.ring, self.read
        if at == self.end:
            raise _fail("the sequence ends before its last entry", ring, at)
        h = parse_entry_header(ring.sectors(at, 1))
        length = -(-self.size // 512) * 512  # bdrv_getlength: whole sectors
        if h.flushed_file_offset > length:
            raise _fail(
                f"flushed_file_offset {h.flushed_file_offset} is past the end of the file "
                f"({length}): the image has been truncated",
                ring,
                at,
            )
        n_desc = descriptor_sectors(h.descriptor_count)
        if not ring.header_ok(h) or ring.available(at, self.end) < n_desc:
            raise _fail("an entry of the sequence does not follow the one before", ring, at)
        _, descriptors = ring.descriptors(at, h)
        self.read = ring.inc(at, n_desc)
        for d in descriptors:
            self.descriptor(d)
        last = h.last_file_offset
        if length < last and last % MIB:
            grown = -(-last // MIB) * MIB
            self.check_end(grown, "last_file_offset", at)
            self.steps.append(grown)
            self.size = grown

    def descriptor(self, d: LogDescriptor) -> None:
        ring, at = self.ring, self.read
        if d.is_zero:
            step = Write(d.file_offset, d.zero_length)
            self.zeroed += d.zero_length
            if self.zeroed > self.limit:
                raise _fail(f"its zero descriptors zero more than {self.limit} bytes", ring, at)
        else:
            if ring.available(at, self.end) < 1:
                raise _fail("a data descriptor has no data sector", ring, at)
            number, payload = parse_data_sector(ring.sectors(at, 1))
            if number != d.sequence_number:
                raise _fail("a data sector's sequence number is not its entry's", ring, at)
            self.read = ring.inc(at)
            lead, trail = (
                d.leading_bytes.to_bytes(8, "little"),
                d.trailing_bytes.to_bytes(4, "little"),
            )
            step = Write(d.file_offset, LOG_SECTOR, lead + payload + trail)
        if step.length == 0:
            return
        self.check_end(step.offset + step.length, "file_offset", at)
        for lo, hi, what in (
            (0, PROTECTED_END, "the file identifier and headers"),
            (ring.base, ring.base + ring.length, "the log itself"),
        ):
            if step.offset < hi and lo < step.offset + step.length:
                raise _fail(f"a descriptor writes into {what} at {step.offset}", ring, at)
        self.steps.append(step)
        self.size = max(self.size, step.offset + step.length)

    def check_end(self, end: int, field: str, at: int) -> None:
        if end > min(self.limit, _INT64_MAX):
            raise _fail(
                f"{field} {end} lies more than {MAX_REPLAY_GROWTH} bytes past the end of the file",
                self.ring,
                at,
            )


def plan_replay(
    log: bytes, log_guid: bytes, seq: LogSequence, file_size: int, base: int = 0
) -> ReplayPlan:
    """The writes that replay ``seq`` (from :func:`find_active_sequence` on the same
    ``log``, found at file offset ``base``) on a file of ``file_size`` bytes.

    Raises :class:`CorruptImage` where QEMU's replay fails (an entry that does not
    follow the one before, a data sector of another sequence, a ``flushed_file_offset``
    past the end of the file) and for writes outside what this module allows.
    """
    planner = _Planner(_Ring(log, log_guid, base), seq, file_size)
    for _ in range(seq.count):
        planner.entry()
    return ReplayPlan(tuple(planner.steps), planner.size)
