"""Internal snapshots written in place: create, apply (goto) and delete (qcow2.txt
"Snapshots"; QEMU's ``block/qcow2-snapshot.c``).

Everything goes through the in-place writer's allocator, refcount store and overlap
checks (:class:`~qcowlib.formats.qcow2.writer.Qcow2RWDisk`).  The refcount model is
QEMU's: a data cluster counts one reference per L1 table that reaches it (through any
L2 table), an L2 table one per L1 table that points at it, and ``QCOW_OFLAG_COPIED`` is
set exactly where that count is 1.  :func:`update_l1_refcounts` is QEMU's
``qcow2_update_snapshot_refcount`` over whole L2 tables with numpy.

Order of writes, as QEMU's: the snapshot's L1 copy, then the refcounts it needs, then
the snapshot table and the header pointing at it; a delete first drops the entry from
the table, then the references.  A crash leaks clusters at worst.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.errors import CorruptImage, InvalidArgument, UnsupportedFeature
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import tables
from qcowlib.formats.qcow2.allocator import span
from qcowlib.formats.qcow2.hostio import write_fields
from qcowlib.formats.qcow2.overlap import OL_NAMES, QCOW2_OL_ACTIVE_L1, QCOW2_OL_INACTIVE_L1
from qcowlib.formats.qcow2.snapshot import (
    MAX_SNAPSHOTS_SIZE,
    NO_ICOUNT,
    Snapshot,
    SnapshotEntry,
    encode_snapshot_table,
    raw_id,
    raw_name,
)

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.writer import Qcow2RWDisk

__all__ = [
    "SNAPSHOTS",
    "NewSnapshot",
    "SnapshotNotFound",
    "apply_snapshot",
    "create_snapshot",
    "delete_snapshot",
    "update_l1_refcounts",
]

log = logging.getLogger(__name__)

#: L2 tables whose references are counted in one refcount update (bounds memory).
L2_BATCH: Final = 256


class SnapshotNotFound(InvalidArgument):
    """No snapshot has that ID or name."""


@dataclass(frozen=True)
class NewSnapshot:
    """What ``qemu-img snapshot -c`` records besides the disk state."""

    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int = 0
    icount: int = 0
    id_str: str = ""


def _entry(sn: Snapshot, disk_size: int) -> SnapshotEntry:
    """A parsed snapshot as a table entry to write back (QEMU fills in a missing disk
    size with the current one and a missing icount with -1)."""
    return SnapshotEntry(
        l1_table_offset=sn.l1_table_offset,
        l1_size=sn.l1_size,
        id_raw=raw_id(sn),
        name_raw=raw_name(sn),
        extra_data_size=len(sn.extra_data),
        vm_state_size=sn.vm_state_size,
        date_sec=sn.date_sec,
        date_nsec=sn.date_nsec,
        vm_clock_nsec=sn.vm_clock_nsec,
        disk_size=sn.disk_size if sn.disk_size is not None else disk_size,
        icount=sn.icount if sn.icount is not None else NO_ICOUNT,
        unknown_extra_data=sn.extra_data[24:],
    )


def current_entries(disk: Qcow2RWDisk) -> list[SnapshotEntry]:
    """The image's snapshot table as entries to rewrite."""
    size = -(-disk.virtual_size // 512) * 512
    return [_entry(sn, size) for sn in disk.snapshots()]


# -- refcounts over a whole L1 table -------------------------------------------------------
def update_l1_refcounts(disk: Qcow2RWDisk, l1: tables.U64, addend: int) -> tables.U64:
    """Add ``addend`` (-1, 0 or 1) to the refcount of every L2 table in ``l1`` and of
    every cluster their entries reference, then set ``QCOW_OFLAG_COPIED`` in the L2
    entries (written back) and in a copy of ``l1`` (returned, the caller writes it)
    where the refcount is 1.  L2 tables freed by a decrement are not rewritten."""
    cs = disk.cluster_size
    bits = disk.cluster_bits
    out = l1.copy()
    present = np.flatnonzero(l1 & np.uint64(tables.OFFSET_MASK))
    for start in range(0, present.size, L2_BATCH):
        batch = present[start : start + L2_BATCH].tolist()
        l2_offsets = [int(l1[i]) & tables.OFFSET_MASK for i in batch]
        for off in l2_offsets:
            if off % cs:
                disk.signal_corruption(f"L2 table offset {off:#x} is not cluster aligned")
        loaded = [
            tables.decode_table(disk.host.pread_exact(off, cs, "L2 table")) for off in l2_offsets
        ]
        if addend:
            refs = [_refs(disk, t) for t in loaded]
            refs.append(np.array([off // cs for off in l2_offsets], dtype=np.int64))
            disk.allocator.update(np.concatenate(refs), addend)
        for index, off, table in zip(batch, l2_offsets, loaded, strict=True):
            l2_refcount = disk.allocator.get_refcount(off // cs)
            out[index] = _copied(int(l1[index]), l2_refcount == 1)
            if l2_refcount:
                _fix_l2_flags(disk, off, table, bits)
    return out


def check_headroom(disk: Qcow2RWDisk, l1: tables.U64) -> None:
    """Refuse, before anything is written, a new reference to every cluster ``l1``
    reaches that some refcount cannot take (QEMU fails half way with EINVAL and leaks)."""
    cs = disk.cluster_size
    present = np.flatnonzero(l1 & np.uint64(tables.OFFSET_MASK))
    for start in range(0, present.size, L2_BATCH):
        offs = [int(l1[i]) & tables.OFFSET_MASK for i in present[start : start + L2_BATCH]]
        refs = [
            _refs(disk, tables.decode_table(disk.host.pread_exact(o, cs, "L2 table"))) for o in offs
        ]
        refs.append(np.array([o // cs for o in offs], dtype=np.int64))
        clusters, counts = np.unique(np.concatenate(refs), return_counts=True)
        current, _ = disk.allocator.store.get(clusters.astype(np.uint64))
        if np.any(current + counts.astype(np.uint64) > np.uint64(disk.allocator.max_refcount)):
            raise InvalidArgument(
                f"Invalid argument: refcount_bits={disk.header.refcount_bits} cannot hold "
                "another reference to every cluster (amend -o refcount_bits=16 first)"
            )


def _entries(disk: Qcow2RWDisk, table: tables.U64) -> tables.U64:
    return table[0::2] if disk.extended_l2 else table


def _refs(disk: Qcow2RWDisk, table: tables.U64) -> np.ndarray:
    entries = _entries(disk, table)
    plain = entries[(entries & np.uint64(tables.OFLAG_COMPRESSED)) == 0]
    offs = plain & np.uint64(tables.OFFSET_MASK)
    if np.any(offs & np.uint64(disk.cluster_size - 1)):
        disk.signal_corruption("an L2 entry points at an unaligned cluster")
    return tables.referenced_clusters(entries, disk.cluster_bits)


def _fix_l2_flags(disk: Qcow2RWDisk, offset: int, table: tables.U64, bits: int) -> None:
    """Set COPIED exactly on the uncompressed entries whose cluster has refcount 1."""
    entries = _entries(disk, table)
    offs = entries & np.uint64(tables.OFFSET_MASK)
    plain = ((entries & np.uint64(tables.OFLAG_COMPRESSED)) == 0) & (offs != 0)
    if not plain.any():
        return
    counts, _ = disk.allocator.store.get(offs[plain] >> np.uint64(bits))
    flag = np.uint64(tables.OFLAG_COPIED)
    old = entries[plain]
    new = np.where(counts == 1, old | flag, old & ~flag)
    if np.array_equal(old, new):
        return
    entries[plain] = new
    disk.check_overlap(offset, disk.cluster_size, offset >> bits, "L2 table")
    disk.host.pwrite(offset, tables.encode_table(table))


def _copied(entry: int, single: bool) -> int:
    return entry | tables.OFLAG_COPIED if single else entry & ~tables.OFLAG_COPIED


def _write_active_l1(disk: Qcow2RWDisk, l1: tables.U64) -> None:
    off = disk.header.l1_table_offset
    if l1.size:
        _check_l1_area(disk, off, l1.size * 8)
        disk.host.pwrite(off, tables.encode_table(l1))
    disk.l1 = l1
    disk.l2_offsets = l1 & np.uint64(tables.OFFSET_MASK)


def _check_l1_area(
    disk: Qcow2RWDisk, offset: int, length: int, ign: int = QCOW2_OL_ACTIVE_L1
) -> None:
    """An L1 table may span several clusters: check all of them against every area
    but the L1 tables of its kind (``ign``)."""
    hit = disk.first_overlap(offset, length, ign)
    if hit:
        disk.signal_corruption(f"L1 write at {offset:#x} would overlap {OL_NAMES[hit]}")


def _forget_caches(disk: Qcow2RWDisk) -> None:
    disk.tables_changed()


# -- the snapshot table --------------------------------------------------------------------
def write_snapshot_table(disk: Qcow2RWDisk, entries: list[SnapshotEntry]) -> None:
    """qcow2_write_snapshots: the table goes to new clusters, the header is switched to
    it in one write, then the old table's clusters are freed."""
    cs = disk.cluster_size
    raw = encode_snapshot_table(entries)
    if len(raw) > MAX_SNAPSHOTS_SIZE:
        raise InvalidArgument("the snapshot table would exceed its 64 MiB cap")
    offset = 0
    if entries:
        offset = disk.alloc_clusters(-(-len(raw) // cs))
        disk.flush()
        disk.check_overlap(offset, len(raw), None, "snapshot table")
        disk.host.pwrite(offset, raw)
        disk.flush()
    old_offset = disk.header.snapshots_offset
    old_size = _table_size(disk)
    write_fields(disk.host, nb_snapshots=len(entries), snapshots_offset=offset)
    disk.flush()
    disk.header = disk.header.replace(nb_snapshots=len(entries), snapshots_offset=offset)
    _forget_caches(disk)
    if old_size:
        disk.allocator.free(list(span(old_offset, old_size, cs)))


def _table_size(disk: Qcow2RWDisk) -> int:
    from qcowlib.formats.qcow2.snapshot import snapshot_table_size

    return snapshot_table_size(disk.snapshots()) if disk.header.nb_snapshots else 0


# -- the operations --------------------------------------------------------------------------
def _refuse_unsupported(disk: Qcow2RWDisk) -> None:
    if disk.header.has_data_file:
        raise UnsupportedFeature("internal snapshots of images with an external data file")


def _new_id(entries: list[SnapshotEntry]) -> str:
    """find_new_snapshot_id: one more than the largest numeric ID."""
    top = 0
    for e in entries:
        try:
            top = max(top, int(e.id_str))
        except ValueError:
            continue
    return str(top + 1)


def create_snapshot(disk: Qcow2RWDisk, new: NewSnapshot) -> SnapshotEntry:
    """qcow2_snapshot_create: copy the active L1, take a reference on everything it
    reaches, append the entry to the table.  Returns the new entry."""
    _refuse_unsupported(disk)
    entries = current_entries(disk)
    if len(entries) >= hdr.MAX_SNAPSHOTS:
        raise InvalidArgument("Maximum number of snapshots reached")
    ident = new.id_str or _new_id(entries)
    if any(e.id_str == ident for e in entries):
        raise InvalidArgument(f"Snapshot with ID '{ident}' already exists")
    cs = disk.cluster_size
    l1 = disk.l1
    check_headroom(disk, l1)
    l1_offset = disk.alloc_clusters(-(-l1.size * 8 // cs)) if l1.size else 0
    if l1.size:
        disk.check_overlap(l1_offset, l1.size * 8, None, "snapshot L1 table")
        disk.host.pwrite(l1_offset, tables.encode_table(l1))
    updated = update_l1_refcounts(disk, l1, 1)
    _write_active_l1(disk, updated)
    disk.flush()
    entry = SnapshotEntry(
        l1_table_offset=l1_offset,
        l1_size=int(l1.size),
        id_raw=ident.encode(),
        name_raw=new.name.encode(),
        extra_data_size=24,
        vm_state_size=0,
        date_sec=new.date_sec,
        date_nsec=new.date_nsec,
        vm_clock_nsec=new.vm_clock_nsec,
        disk_size=disk.virtual_size,
        icount=new.icount,
        unknown_extra_data=b"",
    )
    write_snapshot_table(disk, [*entries, entry])
    return entry


def find_by_id_or_name(entries: list[SnapshotEntry], name: str) -> int:
    """find_snapshot_by_id_or_name: an ID match first, then a name match."""
    for i, e in enumerate(entries):
        if e.id_str == name:
            return i
    for i, e in enumerate(entries):
        if e.name == name:
            return i
    raise SnapshotNotFound(f"no snapshot with ID or name {name!r}")


def apply_snapshot(disk: Qcow2RWDisk, name: str) -> None:
    """qcow2_snapshot_goto: make the snapshot's L1 table the active one (its disk size
    too), taking references for it before dropping the old active table's."""
    _refuse_unsupported(disk)
    entries = current_entries(disk)
    sn = entries[find_by_id_or_name(entries, name)]
    if sn.l1_size * 8 > hdr.MAX_L1_SIZE_BYTES:
        raise CorruptImage("Snapshot L1 table is too large", file=disk.filename)
    if sn.l1_table_offset % disk.cluster_size or (
        sn.l1_table_offset + sn.l1_size * 8 > disk.host.size
    ):
        raise CorruptImage("Snapshot L1 table offset invalid", file=disk.filename)
    raw = disk.host.pread_exact(sn.l1_table_offset, sn.l1_size * 8, "snapshot L1 table")
    check_headroom(disk, tables.decode_table(raw))
    size = sn.disk_size
    if size != disk.virtual_size:
        _set_size(disk, size)
    if disk.l1.size < sn.l1_size:
        disk.grow_l1(sn.l1_size)
        _forget_caches(disk)
    raw = disk.host.pread_exact(sn.l1_table_offset, sn.l1_size * 8, "snapshot L1 table")
    sn_l1 = np.zeros(disk.l1.size, dtype=np.uint64)
    sn_l1[: sn.l1_size] = tables.decode_table(raw)
    inactive = update_l1_refcounts(disk, sn_l1[: sn.l1_size], 1)
    if not np.array_equal(inactive, sn_l1[: sn.l1_size]):
        _check_l1_area(disk, sn.l1_table_offset, sn.l1_size * 8, QCOW2_OL_INACTIVE_L1)
        disk.host.pwrite(sn.l1_table_offset, tables.encode_table(inactive))
    old = disk.l1.copy()
    _write_active_l1(disk, sn_l1)
    disk.flush()
    update_l1_refcounts(disk, old, -1)
    _forget_caches(disk)
    _write_active_l1(disk, update_l1_refcounts(disk, disk.l1, 0))
    _forget_caches(disk)
    disk.flush()


def _set_size(disk: Qcow2RWDisk, size: int) -> None:
    """The snapshot was taken at another virtual size: switch to it (the L1 table is
    about to be replaced, so nothing is unmapped here; QEMU truncates the same way)."""
    if size % 512:
        raise CorruptImage("snapshot disk size is not a multiple of 512", file=disk.filename)
    write_fields(disk.host, size=size)
    disk.flush()
    disk.header = disk.header.replace(size=size)
    disk.virtual_size = size


def delete_snapshot(disk: Qcow2RWDisk, ident: str | None, name: str | None) -> SnapshotEntry:
    """qcow2_snapshot_delete: the entry matching ``ident`` and ``name`` (either may be
    None) leaves the table, then its references and L1 table are dropped."""
    _refuse_unsupported(disk)
    entries = current_entries(disk)
    found = [
        i
        for i, e in enumerate(entries)
        if (ident is None or e.id_str == ident) and (name is None or e.name == name)
    ]
    if not found:
        raise SnapshotNotFound("Can't find the snapshot")
    sn = entries.pop(found[0])
    write_snapshot_table(disk, entries)
    if sn.l1_size:
        raw = disk.host.pread_exact(sn.l1_table_offset, sn.l1_size * 8, "snapshot L1 table")
        update_l1_refcounts(disk, tables.decode_table(raw), -1)
        disk.allocator.free(list(span(sn.l1_table_offset, sn.l1_size * 8, disk.cluster_size)))
    _forget_caches(disk)
    _write_active_l1(disk, update_l1_refcounts(disk, disk.l1, 0))
    _forget_caches(disk)
    disk.flush()
    return sn


def snapshot_by_name(disk: Qcow2RWDisk, name: str) -> SnapshotEntry | None:
    """bdrv_snapshot_find: the first snapshot with this name (qemu-img -d looks by name)."""
    return next((e for e in current_entries(disk) if e.name == name), None)


class _Snapshots:
    """The registry's ``snapshot`` part for qcow2: each call opens the image for writing
    (taking QEMU's write locks) without its backing chain."""

    def create(self, path: str, new: NewSnapshot) -> None:
        from qcowlib.formats.qcow2.writer import open_rw_layer

        with open_rw_layer(path) as disk:
            create_snapshot(disk, new)

    def apply(self, path: str, name: str) -> None:
        from qcowlib.formats.qcow2.writer import open_rw_layer

        with open_rw_layer(path) as disk:
            apply_snapshot(disk, name)

    def delete(self, path: str, name: str) -> None:
        """As ``qemu-img snapshot -d``: the first snapshot with this *name*."""
        from qcowlib.formats.qcow2.writer import open_rw_layer

        with open_rw_layer(path) as disk:
            found = snapshot_by_name(disk, name)
            if found is None:
                raise SnapshotNotFound("snapshot not found")
            delete_snapshot(disk, found.id_str, found.name)


SNAPSHOTS: Final = _Snapshots()
