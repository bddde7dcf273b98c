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
        try:
            id_str = bytes(mv[pos : pos + h.id_str_size]).decode("utf-8")
            pos += h.id_str_size
            name = bytes(mv[pos : pos + h.name_size]).decode("utf-8")
            pos += h.name_size
        except UnicodeDecodeError:
            raise CorruptImage(
                f"snapshot {i} has an undecodable name", structure="snapshot table", offset=where
            ) from None
        pos = (pos + 7) & ~7
        known = SNAPSHOT_EXTRA.parse(extra[:SNAPSHOT_EXTRA_SIZE].ljust(SNAPSHOT_EXTRA_SIZE, b"\0"))
        vm_state_size = known.vm_state_size_large if extra_len >= 8 else h.vm_state_size
        disk_size = known.disk_size if extra_len >= 16 else None
        icount = known.icount if extra_len >= 24 and known.icount != 2**64 - 1 else None
        out.append(
            Snapshot(
                h.l1_table_offset,
                h.l1_size,
                id_str,
                name,
                h.date_sec,
                h.date_nsec,
                h.vm_clock_nsec,
                vm_state_size,
                disk_size,
                icount,
                extra,
            )
        )
    return out
