"""VHDX file identifier, headers and region table (MS-VHDX 2.2, 2.2.2, 2.2.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    QcowlibError,
    TruncatedImage,
    UnsupportedFeature,
)
from qcowlib.formats._layout import parse_fixed as _parse
from qcowlib.formats.vhdx.spec import (
    _CHECKSUM_AT,
    _HEADER_SIGNATURE,
    _REGION_ENTRY_SIZE,
    _REGION_SIGNATURE,
    FILE_IDENTIFIER,
    HEADER,
    MIB,
    REGION_ENTRY,
    REGION_TABLE_HEADER,
    VHDX_BAT_GUID,
    VHDX_HEADER_OFFSETS,
    VHDX_HEADER_SECTION_END,
    VHDX_HEADER_SIZE,
    VHDX_MAX_ENTRIES,
    VHDX_METADATA_GUID,
    VHDX_REGION_TABLE_SIZE,
    VHDX_SIGNATURE,
    _build,
    _checksum,
    _with_checksum,
    guid_text,
)

if TYPE_CHECKING:
    # numpy is imported where the BAT is decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    BatArray = npt.NDArray[np.uint64]


# ---------------------------------------------------------------------------------------
# file type identifier (spec 2.2.1)


def parse_file_identifier(data: bytes) -> str:
    """The creator string of the file type identifier at offset 0.

    Raises :class:`TruncatedImage` for short data and :class:`FormatError` without the
    ``vhdxfile`` signature.
    """
    if len(data) >= 8 and data[:8] != VHDX_SIGNATURE:
        raise FormatError(
            "VHDX file identifier 'vhdxfile' is missing",
            structure="vhdx file identifier",
            field="signature",
            offset=0,
        )
    fi = _parse(FILE_IDENTIFIER, data, "vhdx file identifier", 0)
    return str(fi.creator.decode("utf-16-le", "replace").split("\0", 1)[0])


def build_file_identifier(creator: str) -> bytes:
    """The 64 KiB file type identifier with ``creator`` (at most 256 UTF-16 units)."""
    raw = creator.encode("utf-16-le")[:512]
    return (VHDX_SIGNATURE + raw).ljust(64 * 1024, b"\0")


# ---------------------------------------------------------------------------------------
# headers (spec 2.2.2)


@dataclass(frozen=True)
class Header:
    """One of the two 4 KiB headers (QEMU ``VHDXHeader``)."""

    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int
    checksum: int = 0

    @property
    def log_needs_replay(self) -> bool:
        """A non-zero log GUID: the log holds entries that must be replayed first."""
        return any(self.log_guid)


def parse_header(data: bytes, offset: int = 0) -> Header:
    """Parse a 4 KiB header found at file ``offset``.

    Raises :class:`TruncatedImage` for short data, :class:`FormatError` without the
    ``head`` signature and :class:`CorruptImage` when the CRC-32C is wrong.
    """
    what = "vhdx header"
    if len(data) < VHDX_HEADER_SIZE:
        raise TruncatedImage(
            f"{what} is truncated ({len(data)} of {VHDX_HEADER_SIZE} bytes)",
            structure=what,
            offset=offset,
        )
    block = bytes(data[:VHDX_HEADER_SIZE])
    h = _parse(HEADER, block, what, offset)
    if h.signature != _HEADER_SIGNATURE:
        raise FormatError(
            "VHDX header signature 'head' is missing",
            structure=what,
            field="signature",
            offset=offset,
        )
    if h.checksum != _checksum(block):
        raise CorruptImage(
            "VHDX header checksum is wrong",
            structure=what,
            field="checksum",
            offset=offset + _CHECKSUM_AT,
        )
    return Header(
        sequence_number=h.sequence_number,
        file_write_guid=h.file_write_guid,
        data_write_guid=h.data_write_guid,
        log_guid=h.log_guid,
        log_version=h.log_version,
        version=h.version,
        log_length=h.log_length,
        log_offset=h.log_offset,
        checksum=h.checksum,
    )


def build_header(h: Header) -> bytes:
    """The 4 KiB of ``h`` with a freshly computed CRC-32C (``h.checksum`` ignored).

    Raises :class:`FormatError` when a field does not fit its width.
    """
    raw = _build(
        HEADER,
        {
            "signature": _HEADER_SIGNATURE,
            "checksum": 0,
            "sequence_number": h.sequence_number,
            "file_write_guid": h.file_write_guid,
            "data_write_guid": h.data_write_guid,
            "log_guid": h.log_guid,
            "log_version": h.log_version,
            "version": h.version,
            "log_length": h.log_length,
            "log_offset": h.log_offset,
        },
        "vhdx header",
    )
    return _with_checksum(raw.ljust(VHDX_HEADER_SIZE, b"\0"))


def updated_header(
    block: bytes,
    *,
    sequence_number: int,
    file_write_guid: bytes,
    data_write_guid: bytes | None = None,
    log_guid: bytes | None = None,
) -> bytes:
    """A 4 KiB header block as read from the file, with a new sequence number and file
    write GUID (and data write GUID, log GUID when given) and a fresh CRC-32C: the
    update of the non-current header in the two-header protocol (spec 2.2.2.1, QEMU's
    ``vhdx_update_header``, which keeps every other byte of the block).

    Raises :class:`FormatError` for a sequence number that does not fit 64 bits.
    """
    if not 0 <= sequence_number < 1 << 64:
        raise FormatError(
            f"VHDX header sequence number {sequence_number} does not fit 64 bits",
            structure="vhdx header",
            field="sequence_number",
        )
    out = bytearray(bytes(block[:VHDX_HEADER_SIZE]).ljust(VHDX_HEADER_SIZE, b"\0"))
    out[8:16] = sequence_number.to_bytes(8, "little")
    out[16:32] = file_write_guid
    if data_write_guid is not None:
        out[32:48] = data_write_guid
    if log_guid is not None:
        out[48:64] = log_guid
    return _with_checksum(bytes(out))


def current_header(area: bytes) -> tuple[Header, int]:
    """The current header of the first 320 KiB and its offset (spec 2.2.2.1).

    The current header is the valid one with the higher sequence number.  Raises
    :class:`TruncatedImage` when the area is too short for either header,
    :class:`CorruptImage` when neither is valid (the error of the first one is chained
    in the message) or both are valid with the same sequence number but differ, and
    :class:`UnsupportedFeature` for a header version other than 1.
    """
    if len(area) < VHDX_HEADER_OFFSETS[0] + VHDX_HEADER_SIZE:
        raise TruncatedImage(
            "VHDX file is too short for its headers",
            structure="vhdx header",
            offset=VHDX_HEADER_OFFSETS[0],
        )
    found: list[tuple[Header, int]] = []
    errors: list[str] = []
    for at in VHDX_HEADER_OFFSETS:
        try:
            found.append((parse_header(area[at : at + VHDX_HEADER_SIZE], at), at))
        except FormatError as exc:
            errors.append(str(exc))
    if not found:
        raise CorruptImage(
            f"no valid VHDX header found ({'; '.join(errors)})",
            structure="vhdx header",
            offset=VHDX_HEADER_OFFSETS[0],
        )
    found.sort(key=lambda f: f[0].sequence_number, reverse=True)
    best, at = found[0]
    if len(found) == 2 and found[1][0].sequence_number == best.sequence_number:
        other = found[1][0]
        if other != best:
            raise CorruptImage(
                "both VHDX headers have the same sequence number but differ",
                structure="vhdx header",
                field="sequence_number",
                offset=VHDX_HEADER_OFFSETS[0] + 8,
            )
        at = VHDX_HEADER_OFFSETS[0]
    if best.version != 1:
        raise UnsupportedFeature(
            f"VHDX header version {best.version} is not 1",
            structure="vhdx header",
            field="version",
            offset=at + 66,
        )
    return best, at


# ---------------------------------------------------------------------------------------
# region table (spec 2.2.3)


@dataclass(frozen=True)
class RegionEntry:
    """A region table entry (QEMU ``VHDXRegionTableEntry``)."""

    guid: bytes
    file_offset: int
    length: int
    required: bool


def parse_region_table(data: bytes, offset: int = 0) -> tuple[RegionEntry, ...]:
    """The entries of a 64 KiB region table found at file ``offset``.

    Raises :class:`TruncatedImage` for short data, :class:`FormatError` without the
    ``regi`` signature and :class:`CorruptImage` for a wrong CRC-32C, more than 2047
    entries or a GUID listed twice.
    """
    what = "vhdx region table"
    if len(data) < VHDX_REGION_TABLE_SIZE:
        raise TruncatedImage(
            f"{what} is truncated ({len(data)} of {VHDX_REGION_TABLE_SIZE} bytes)",
            structure=what,
            offset=offset,
        )
    block = bytes(data[:VHDX_REGION_TABLE_SIZE])
    rt = _parse(REGION_TABLE_HEADER, block, what, offset)
    if rt.signature != _REGION_SIGNATURE:
        raise FormatError(
            "VHDX region table signature 'regi' is missing",
            structure=what,
            field="signature",
            offset=offset,
        )
    if rt.checksum != _checksum(block):
        raise CorruptImage(
            "VHDX region table checksum is wrong",
            structure=what,
            field="checksum",
            offset=offset + _CHECKSUM_AT,
        )
    if rt.entry_count > VHDX_MAX_ENTRIES:
        raise CorruptImage(
            f"VHDX region table has {rt.entry_count} entries (limit {VHDX_MAX_ENTRIES})",
            structure=what,
            field="entry_count",
            offset=offset + 8,
        )
    entries: list[RegionEntry] = []
    for i in range(rt.entry_count):
        at = 16 + _REGION_ENTRY_SIZE * i
        e = _parse(REGION_ENTRY, block[at:], "vhdx region entry", offset + at)
        if any(r.guid == e.guid for r in entries):
            raise CorruptImage(
                f"VHDX region {guid_text(e.guid)} is listed twice",
                structure=what,
                field=f"entry[{i}]",
                offset=offset + at,
            )
        entries.append(RegionEntry(e.guid, e.file_offset, e.length, bool(e.data_bits & 1)))
    return tuple(entries)


def build_region_table(entries: Sequence[RegionEntry]) -> bytes:
    """The 64 KiB region table of ``entries`` with its CRC-32C.

    Raises :class:`FormatError` for more than 2047 entries or fields that do not fit.
    """
    if len(entries) > VHDX_MAX_ENTRIES:
        raise FormatError("too many VHDX region entries", structure="vhdx region table")
    out = bytearray(
        _build(
            REGION_TABLE_HEADER,
            {"signature": _REGION_SIGNATURE, "checksum": 0, "entry_count": len(entries)}
            | {"reserved": 0},
            "vhdx region table",
        )
    )
    for e in entries:
        out += _build(
            REGION_ENTRY,
            {
                "guid": e.guid,
                "file_offset": e.file_offset,
                "length": e.length,
                "data_bits": int(e.required),
            },
            "vhdx region entry",
        )
    return _with_checksum(bytes(out.ljust(VHDX_REGION_TABLE_SIZE, b"\0")))


def region_problems(
    entries: Sequence[RegionEntry],
    file_size: int,
    offset: int = 0,
    log: tuple[int, int] | None = None,
) -> list[QcowlibError]:
    """Everything refused in the entries of a region table (spec 2.2.3.1), in order.

    ``offset`` is where the table is (for messages); ``log`` is the current header's
    ``(log_offset, log_length)``.  :class:`UnsupportedFeature` for an unknown required
    region, :class:`CorruptImage` for a missing BAT or metadata region, one not 1 MiB
    aligned, inside the header section or overlapping the log or another region (any
    entry, known or not, as QEMU's ``vhdx_open_region_tables`` checks them), and
    :class:`TruncatedImage` for one past the end of the file.
    """
    what = "vhdx region table"
    found: list[QcowlibError] = []
    for i, r in enumerate(entries):
        at = offset + 16 + _REGION_ENTRY_SIZE * i
        if r.guid not in (VHDX_BAT_GUID, VHDX_METADATA_GUID):
            if r.required:
                found.append(
                    UnsupportedFeature(
                        f"VHDX has an unknown required region {guid_text(r.guid)}",
                        structure=what,
                        field=f"entry[{i}]",
                        offset=at,
                    )
                )
            continue
        if r.file_offset % MIB or r.file_offset < VHDX_HEADER_SECTION_END or r.length % MIB:
            found.append(
                CorruptImage(
                    f"VHDX region {guid_text(r.guid)} is not 1 MiB aligned past the headers",
                    structure=what,
                    field=f"entry[{i}].file_offset",
                    offset=at + 16,
                )
            )
        elif r.file_offset + r.length > file_size:
            found.append(
                TruncatedImage(
                    f"VHDX region {guid_text(r.guid)} lies past the end of the file",
                    structure=what,
                    field=f"entry[{i}].file_offset",
                    offset=at + 16,
                )
            )
    by_guid = {r.guid: r for r in entries}
    for needed, name in ((VHDX_BAT_GUID, "BAT"), (VHDX_METADATA_GUID, "metadata")):
        if needed not in by_guid:
            found.append(CorruptImage(f"VHDX has no {name} region", structure=what, offset=offset))
    found += _overlap_problems(entries, offset, log)
    return found


def _overlap_problems(
    entries: Sequence[RegionEntry], offset: int, log: tuple[int, int] | None
) -> list[QcowlibError]:
    """Each entry that meets the log or an earlier entry, in QEMU's order."""
    found: list[QcowlibError] = []
    taken = [("the log", log[0], log[0] + log[1])] if log is not None else []
    for i, r in enumerate(entries):
        clash = next((n for n, a, b in taken if overlaps(r.file_offset, r.length, a, b)), None)
        if clash is not None:
            found.append(
                CorruptImage(
                    f"VHDX region {guid_text(r.guid)} overlaps {clash}",
                    structure="vhdx region table",
                    field=f"entry[{i}].file_offset",
                    offset=offset + 16 + _REGION_ENTRY_SIZE * i + 16,
                )
            )
        taken.append((f"region {guid_text(r.guid)}", r.file_offset, r.file_offset + r.length))
    return found


def overlaps(start: int, length: int, region_start: int, region_end: int) -> bool:
    """Whether ``[start, start + length)`` meets ``[region_start, region_end)``, as
    QEMU's ``vhdx_region_check`` decides it (an empty region inside the range counts)."""
    return not (start >= region_end or start + length <= region_start)


def check_regions(
    entries: Sequence[RegionEntry],
    file_size: int,
    offset: int = 0,
    log: tuple[int, int] | None = None,
) -> tuple[RegionEntry, RegionEntry]:
    """The BAT and metadata regions of a region table, checked (spec 2.2.3.1).

    Raises the first of :func:`region_problems`.
    """
    problems = region_problems(entries, file_size, offset, log)
    if problems:
        raise problems[0]
    found = {r.guid: r for r in entries}
    return found[VHDX_BAT_GUID], found[VHDX_METADATA_GUID]
