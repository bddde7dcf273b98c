"""Snapshot table entries (qcow2.txt "Snapshots")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import construct as cs

from qcowlib.errors import CorruptImage, TruncatedImage
from qcowlib.formats._layout import parse_fixed
from qcowlib.formats.qcow2.header import MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOTS

#: QCOW_MAX_SNAPSHOTS_SIZE: the whole table is capped at 64 MiB.
MAX_SNAPSHOTS_SIZE: Final = 1024 * MAX_SNAPSHOTS

#: The fixed part of a snapshot table entry (QEMU's QCowSnapshotHeader); the extra data,
#: the ID string and the name follow, then padding to 8 bytes.
SNAPSHOT_HEADER = cs.Struct(
    "l1_table_offset" / cs.Int64ub,
    "l1_size" / cs.Int32ub,
    "id_str_size" / cs.Int16ub,
    "name_size" / cs.Int16ub,
    "date_sec" / cs.Int32ub,
    "date_nsec" / cs.Int32ub,
    "vm_clock_nsec" / cs.Int64ub,
    "vm_state_size" / cs.Int32ub,
    "extra_data_size" / cs.Int32ub,
)
SNAPSHOT_HEADER_SIZE: Final = SNAPSHOT_HEADER.sizeof()
#: The extra data fields QEMU knows (QCowSnapshotExtraData); each is present only when
#: ``extra_data_size`` reaches past it, later fields are kept as unknown bytes.
SNAPSHOT_EXTRA = cs.Struct(
    "vm_state_size_large" / cs.Int64ub,
    "disk_size" / cs.Int64ub,
    "icount" / cs.Int64ub,
)
SNAPSHOT_EXTRA_SIZE: Final = SNAPSHOT_EXTRA.sizeof()
#: ``icount`` of a snapshot taken without instruction counting.
NO_ICOUNT: Final = 2**64 - 1


@dataclass(frozen=True)
class Snapshot:
    """One internal snapshot.  ``icount`` is None where the entry does not record it.

    ``id_str`` and ``name`` are for showing and matching: bytes that are not UTF-8
    (another tool's legacy encoding) read as U+FFFD, as qemu-img's JSON shows them;
    ``id_raw`` and ``name_raw`` are the stored bytes, written back unchanged.
    """

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    extra_data: bytes
    id_raw: bytes = b""
    name_raw: bytes = b""


def parse_snapshot_table(
    data: bytes | memoryview, nb_snapshots: int, base_offset: int = 0
) -> list[Snapshot]:
    """Parse ``nb_snapshots`` entries from ``data`` (the table's bytes from its start).

    Raises :class:`TruncatedImage` when the entries run past ``data`` and
    :class:`CorruptImage` for oversized extra data.
    """
    if nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage("too many snapshots", structure="snapshot table")
    out: list[Snapshot] = []
    pos = 0
    mv = memoryview(data)
    for i in range(nb_snapshots):
        snapshot, pos = _parse_entry(mv, pos, i, base_offset)
        out.append(snapshot)
    return out


def _parse_entry(mv: memoryview, pos: int, i: int, base_offset: int) -> tuple[Snapshot, int]:
    """Entry ``i`` at ``pos`` of the table; returns it and where the next one starts."""
    where = base_offset + pos
    if pos + SNAPSHOT_HEADER_SIZE > len(mv):
        raise TruncatedImage(
            f"snapshot table entry {i} is truncated", structure="snapshot table", offset=where
        )
    h = parse_fixed(SNAPSHOT_HEADER, mv[pos:], "snapshot table", where)
    extra_len = h.extra_data_size
    if extra_len > MAX_SNAPSHOT_EXTRA_DATA:
        raise CorruptImage(
            f"snapshot {i} has {extra_len} bytes of extra data",
            structure="snapshot table",
            field="extra_data_size",
            offset=where + 36,
        )
    pos += SNAPSHOT_HEADER_SIZE
    end = pos + extra_len + h.id_str_size + h.name_size
    if end > len(mv):
        raise TruncatedImage(
            f"snapshot table entry {i} is truncated", structure="snapshot table", offset=where
        )
    extra = bytes(mv[pos : pos + extra_len])
    pos += extra_len
    id_raw = bytes(mv[pos : pos + h.id_str_size])
    pos += h.id_str_size
    name_raw = bytes(mv[pos : pos + h.name_size])
    pos += h.name_size
    vm_state_size, disk_size, icount = known_extra(extra, h.vm_state_size)
    snapshot = Snapshot(
        h.l1_table_offset,
        h.l1_size,
        id_raw.decode("utf-8", "replace"),
        name_raw.decode("utf-8", "replace"),
        h.date_sec,
        h.date_nsec,
        h.vm_clock_nsec,
        vm_state_size,
        disk_size,
        None if icount == NO_ICOUNT else icount,
        extra,
        id_raw,
        name_raw,
    )
    return snapshot, (pos + 7) & ~7


def snapshot_table_size(snapshots: list[Snapshot]) -> int:
    """The bytes a parsed snapshot table spans (entries padded to 8 bytes; the last one
    ends after its name)."""
    size = 0
    for sn in snapshots:
        size = (size + 7) & ~7
        size += SNAPSHOT_HEADER_SIZE + len(sn.extra_data)
        size += len(raw_id(sn)) + len(raw_name(sn))
    return size


def known_extra(extra: bytes, vm_state_size_32: int) -> tuple[int, int | None, int | None]:
    """``(vm_state_size, disk_size, icount)`` from an entry's extra data: each field
    counts only when the extra data reaches past it (None where it does not); without
    the 64-bit VM state size the 32-bit one in the fixed part stands."""
    known = SNAPSHOT_EXTRA.parse(extra[:SNAPSHOT_EXTRA_SIZE].ljust(SNAPSHOT_EXTRA_SIZE, b"\0"))
    n = len(extra)
    return (
        known.vm_state_size_large if n >= 8 else vm_state_size_32,
        known.disk_size if n >= 16 else None,
        known.icount if n >= 24 else None,
    )


@dataclass(frozen=True)
class SnapshotEntry:
    """A snapshot table entry as stored, for rewriting the table (QEMU's QCowSnapshot):
    the names as raw bytes, the extra data QEMU does not know kept as it was."""

    l1_table_offset: int
    l1_size: int
    id_raw: bytes
    name_raw: bytes
    extra_data_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int
    icount: int
    unknown_extra_data: bytes

    @property
    def id_str(self) -> str:
        return _cstr(self.id_raw)

    @property
    def name(self) -> str:
        return _cstr(self.name_raw)

    def encode(self) -> bytes:
        """The entry as qcow2_write_snapshots writes it (extra data at least 24 bytes;
        names up to their first NUL, as QEMU's strlen() sees them)."""
        ident = self.id_raw.split(b"\0", 1)[0]
        name = self.name_raw.split(b"\0", 1)[0]
        extra_size = max(SNAPSHOT_EXTRA_SIZE, self.extra_data_size)
        header = SNAPSHOT_HEADER.build(
            {
                "l1_table_offset": self.l1_table_offset,
                "l1_size": self.l1_size,
                "id_str_size": len(ident),
                "name_size": len(name),
                "date_sec": self.date_sec,
                "date_nsec": self.date_nsec,
                "vm_clock_nsec": self.vm_clock_nsec,
                "vm_state_size": self.vm_state_size if self.vm_state_size <= 0xFFFF_FFFF else 0,
                "extra_data_size": extra_size,
            }
        )
        extra = SNAPSHOT_EXTRA.build(
            {
                "vm_state_size_large": self.vm_state_size,
                "disk_size": self.disk_size,
                "icount": self.icount,
            }
        )
        return bytes(header + extra + self.unknown_extra_data + ident + name)


def encode_snapshot_table(entries: list[SnapshotEntry]) -> bytes:
    """The snapshot table: each entry padded to 8 bytes (qcow2.txt "Snapshots")."""
    table = bytearray()
    for entry in entries:
        table += bytes(-len(table) % 8)
        table += entry.encode()
    return bytes(table)


def raw_id(sn: Snapshot) -> bytes:
    """The ID string's stored bytes (encoded from ``id_str`` for a made-up entry)."""
    return sn.id_raw or sn.id_str.encode()


def raw_name(sn: Snapshot) -> bytes:
    """The name's stored bytes (encoded from ``name`` for a made-up entry)."""
    return sn.name_raw or sn.name.encode()


def _cstr(raw: bytes) -> str:
    """A C string as printf's %s shows it (up to the first NUL)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
