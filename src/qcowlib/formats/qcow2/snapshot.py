"""Snapshot table entries (qcow2.txt "Snapshots")."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from qcowlib.errors import CorruptImage, TruncatedImage
from qcowlib.formats.qcow2.header import MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOTS

#: QCOW_MAX_SNAPSHOTS_SIZE: the whole table is capped at 64 MiB.
MAX_SNAPSHOTS_SIZE: Final = 1024 * MAX_SNAPSHOTS
_ENTRY = struct.Struct(">QIHHIIQII")


@dataclass(frozen=True)
class Snapshot:
    """One internal snapshot.  ``icount`` is None where the entry does not record it."""

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


def parse_snapshot_table(
    data: bytes | memoryview, nb_snapshots: int, base_offset: int = 0
) -> list[Snapshot]:
    """Parse ``nb_snapshots`` entries from ``data`` (the table's bytes from its start).

    Raises :class:`TruncatedImage` when the entries run past ``data`` and
    :class:`CorruptImage` for oversized extra data or undecodable names.
    """
    if nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage("too many snapshots", structure="snapshot table")
    out: list[Snapshot] = []
    pos = 0
    mv = memoryview(data)
    for i in range(nb_snapshots):
        where = base_offset + pos
        if pos + _ENTRY.size > len(mv):
            raise TruncatedImage(
                f"snapshot table entry {i} is truncated", structure="snapshot table", offset=where
            )
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsz, extra_len) = (
            _ENTRY.unpack_from(mv, pos)
        )
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA:
            raise CorruptImage(
                f"snapshot {i} has {extra_len} bytes of extra data",
                structure="snapshot table",
                field="extra_data_size",
                offset=where + 36,
            )
        pos += _ENTRY.size
        end = pos + extra_len + id_len + name_len
        if end > len(mv):
            raise TruncatedImage(
                f"snapshot table entry {i} is truncated", structure="snapshot table", offset=where
            )
        extra = bytes(mv[pos : pos + extra_len])
        pos += extra_len
        try:
            id_str = bytes(mv[pos : pos + id_len]).decode("utf-8")
            pos += id_len
            name = bytes(mv[pos : pos + name_len]).decode("utf-8")
            pos += name_len
        except UnicodeDecodeError:
            raise CorruptImage(
                f"snapshot {i} has an undecodable name", structure="snapshot table", offset=where
            ) from None
        pos = (pos + 7) & ~7
        vm_state_size = vmsz
        disk_size = icount = None
        if extra_len >= 8:
            vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            icount = struct.unpack_from(">Q", extra, 16)[0]
            if icount == 2**64 - 1:
                icount = None
        out.append(
            Snapshot(
                l1_off,
                l1_size,
                id_str,
                name,
                dsec,
                dnsec,
                clock,
                vm_state_size,
                disk_size,
                icount,
                extra,
            )
        )
    return out
