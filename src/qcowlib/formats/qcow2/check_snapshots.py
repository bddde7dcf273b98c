"""The snapshot table as ``check`` reads and repairs it (QEMU ``block/qcow2-snapshot.c``:
``qcow2_check_read_snapshot_table``, ``qcow2_do_read_snapshots``,
``qcow2_check_fix_snapshot_table``, ``qcow2_write_snapshots``).

Unlike opening, which refuses a bad table, the check reads what it can: too much extra
data or a table that is too big are errors to report, or with ``-r all`` to fix by
dropping the extra data or the overhanging snapshots.  Entries are decoded and encoded
by :mod:`qcowlib.formats.qcow2.snapshot`.
"""

from __future__ import annotations

from qcowlib.formats.qcow2 import snapshot as _snapshot
from qcowlib.formats.qcow2.checkstate import (
    BDRV_FIX_ERRORS,
    EFBIG,
    EINVAL,
    EIO,
    INT64_MAX,
    INT_MAX,
    CheckFailed,
    CheckState,
    Result,
)
from qcowlib.formats.qcow2.header import MAX_SNAPSHOT_EXTRA_DATA
from qcowlib.formats.qcow2.hostio import write_fields
from qcowlib.formats.qcow2.repair import alloc_clusters, free_clusters
from qcowlib.formats.qcow2.snapshot import (
    MAX_SNAPSHOTS_SIZE,
    NO_ICOUNT,
    SNAPSHOT_EXTRA_SIZE,
    SNAPSHOT_HEADER_SIZE,
    SnapshotEntry,
    encode_snapshot_table,
    known_extra,
)


def check_read_snapshot_table(chk: CheckState, res: Result, fix: int) -> None:
    """qcow2_check_read_snapshot_table and qcow2_do_read_snapshots."""
    repair = bool(fix & BDRV_FIX_ERRORS)
    head = chk.host.pread(60, 12)
    nb_snapshots, offset = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
    if offset & (chk.cluster_size - 1) or INT64_MAX - nb_snapshots * SNAPSHOT_HEADER_SIZE < offset:
        res.check_errors += 1
        chk.messages.add("ERROR snapshot table offset invalid")
        raise CheckFailed(EINVAL)
    chk.snapshots_offset = offset
    snapshots: list[SnapshotEntry] = []
    nb_clusters_reduced = 0
    extra_data_dropped = 0
    pos = offset
    table_length = 0
    for i in range(nb_snapshots):
        pre_sn_offset = pos
        table_length = (table_length + 7) & ~7
        pos = (pos + 7) & ~7
        sn, pos, extra = _read_entry(chk, pos, i, repair, res)
        if extra > MAX_SNAPSHOT_EXTRA_DATA:
            extra_data_dropped += 1
        snapshots.append(sn)
        table_length += SNAPSHOT_HEADER_SIZE + sn.extra_data_size + len(sn.id_raw)
        table_length += len(sn.name_raw)
        if table_length > MAX_SNAPSHOTS_SIZE or pos - offset > INT_MAX:
            if not repair:
                res.check_errors += 1
                chk.messages.add(
                    "ERROR failed to read the snapshot table: Snapshot table is too big"
                )
                chk.messages.add(
                    f"You can force-remove all {nb_snapshots - i} overhanging snapshots "
                    "with qemu-img check -r all"
                )
                raise CheckFailed(EFBIG)
            chk.messages.add(
                f"Discarding {nb_snapshots - i} overhanging snapshots (snapshot table is too big)"
            )
            nb_clusters_reduced += nb_snapshots - i
            snapshots.pop()
            pos = pre_sn_offset
            break
    chk.snapshots = snapshots
    chk.snapshots_size = pos - offset if nb_snapshots else 0
    chk.metadata_moved()
    res.corruptions += nb_clusters_reduced + extra_data_dropped
    if nb_clusters_reduced:
        # The header must agree before the refcounts are checked; the snapshots
        # dropped leak their clusters, which the refcount check then frees.
        write_fields(chk.host, nb_snapshots=len(snapshots))
        res.corruptions_fixed += nb_clusters_reduced
        res.corruptions -= nb_clusters_reduced
    if chk.h.version >= 3:
        for i, sn in enumerate(snapshots):
            if sn.extra_data_size < 16:
                res.corruptions += 1
                word = "Repairing" if repair else "ERROR"
                chk.messages.add(f"{word} snapshot table entry {i} is incomplete")


def _read_entry(
    chk: CheckState, pos: int, i: int, repair: bool, res: Result
) -> tuple[SnapshotEntry, int, int]:
    """Entry ``i`` at ``pos``: the entry, where the next one starts, and the size of
    extra data it claims (only ``MAX_SNAPSHOT_EXTRA_DATA`` of which are kept)."""
    read = chk.host.pread
    h = _snapshot.SNAPSHOT_HEADER.parse(read(pos, SNAPSHOT_HEADER_SIZE))
    id_len, name_len, extra = h.id_str_size, h.name_size, h.extra_data_size
    pos += SNAPSHOT_HEADER_SIZE
    kept_extra = extra
    if extra > MAX_SNAPSHOT_EXTRA_DATA:
        if not repair:
            res.check_errors += 1
            chk.messages.add(
                "ERROR failed to read the snapshot table: Too much extra metadata "
                f"in snapshot table entry {i}"
            )
            chk.messages.add("You can force-remove this extra metadata with qemu-img check -r all")
            raise CheckFailed(EFBIG)
        chk.messages.add(
            f"Discarding too much extra metadata in snapshot table entry {i} "
            f"({extra} > {MAX_SNAPSHOT_EXTRA_DATA})"
        )
        kept_extra = MAX_SNAPSHOT_EXTRA_DATA
    vm_state_size, disk_size, icount = known_extra(
        read(pos, min(SNAPSHOT_EXTRA_SIZE, extra)), h.vm_state_size
    )
    unknown = (
        read(pos + SNAPSHOT_EXTRA_SIZE, kept_extra - SNAPSHOT_EXTRA_SIZE)
        if kept_extra > SNAPSHOT_EXTRA_SIZE
        else b""
    )
    pos += extra
    names = read(pos, id_len + name_len)
    pos += id_len + name_len
    entry = SnapshotEntry(
        l1_table_offset=h.l1_table_offset,
        l1_size=h.l1_size,
        id_raw=names[:id_len],
        name_raw=names[id_len:],
        extra_data_size=kept_extra,
        vm_state_size=vm_state_size,
        date_sec=h.date_sec,
        date_nsec=h.date_nsec,
        vm_clock_nsec=h.vm_clock_nsec,
        disk_size=disk_size if disk_size is not None else -(-chk.h.size // 512) * 512,
        icount=icount if icount is not None else NO_ICOUNT,
        unknown_extra_data=unknown,
    )
    return entry, pos, extra


def check_fix_snapshot_table(chk: CheckState, res: Result, fix: int) -> None:
    """qcow2_check_fix_snapshot_table: rewrite the table (qcow2_write_snapshots)."""
    if not (res.corruptions and fix & BDRV_FIX_ERRORS):
        return
    table = encode_snapshot_table(chk.snapshots)
    if len(table) > MAX_SNAPSHOTS_SIZE:
        res.check_errors += 1
        chk.messages.add(f"ERROR failed to update snapshot table: {EFBIG}")
        raise CheckFailed(EFBIG)
    offset = alloc_clusters(chk, len(table))
    if offset is None:
        return  # would need a new refcount block: leave the table as it is
    if not chk.pre_write_overlap_check(0, offset, len(table)):
        res.check_errors += 1
        chk.messages.add(f"ERROR failed to update snapshot table: {EIO}")
        raise CheckFailed(EIO)
    chk.write(offset, table)
    write_fields(chk.host, nb_snapshots=len(chk.snapshots), snapshots_offset=offset)
    old_offset, old_size = chk.snapshots_offset, chk.snapshots_size
    chk.snapshots_offset, chk.snapshots_size = offset, len(table)
    chk.metadata_moved()
    free_clusters(chk, old_offset, old_size)
    res.corruptions_fixed += res.corruptions
    res.corruptions = 0
