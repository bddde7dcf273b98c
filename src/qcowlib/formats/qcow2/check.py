"""``check`` of a qcow2 image, as ``qemu-img check`` does it.

The algorithm is QEMU 7.2's, step for step, so that counts, messages and exit statuses
agree with ``qemu-img check`` (``block/qcow2-refcount.c``: ``qcow2_check_refcounts``,
``calculate_refcounts``, ``check_refcounts_l1``/``check_refcounts_l2``,
``check_refblocks``, ``compare_refcounts``, ``check_oflag_copied``,
``rebuild_refcount_structure``; ``block/qcow2-snapshot.c``:
``qcow2_check_read_snapshot_table``; ``block/qcow2-bitmap.c``:
``qcow2_check_bitmaps_refcounts``; ``qemu-img.c``: ``img_check``):

1. Every reference that metadata makes to a host cluster is counted into an in-memory
   refcount table (QEMU's *IMRT*, :mod:`~qcowlib.formats.qcow2.imrt`): the header, the
   active and every snapshot's L1 table, their L2 tables and the data clusters those
   reference (:mod:`~qcowlib.formats.qcow2.check_l1`,
   :mod:`~qcowlib.formats.qcow2.check_l2`), the snapshot table, the refcount table and
   blocks, the crypto header area and the persistent bitmaps' directory, tables and data.
2. The IMRT is compared with the refcounts stored on disk
   (:mod:`~qcowlib.formats.qcow2.check_refblocks`): a stored refcount lower than the
   references is a *corruption*, a higher one a *leak*.
3. ``OFLAG_COPIED`` is checked on every active L1 and L2 entry
   (:mod:`~qcowlib.formats.qcow2.check_copied`).

Tables are handled whole with numpy, and only as far as they lie inside the file.
Repair (``fix``) writes refcount blocks, the refcount table (rebuilt from the IMRT when
needed, :mod:`~qcowlib.formats.qcow2.repair`), L1/L2 flag bits and header fields, never
guest data.  As ``qemu-img check -r`` does, a repair that fixed anything is followed by a
second, read-only pass whose result is reported together with the fixed counts.

Messages QEMU prints to stderr while checking are collected in
:attr:`CheckReport.messages`, in QEMU's order, up to
:data:`~qcowlib.formats.qcow2.checkstate.MAX_MESSAGES` (the counts cover everything).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.checkreport import CheckReport
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2.bitmap import (
    BME_TABLE_ENTRY_FLAG_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BME_TABLE_ENTRY_RESERVED_MASK,
    MAX_BITMAP_DIRECTORY_SIZE,
    bitmap_tables,
)
from qcowlib.formats.qcow2.check_copied import check_oflag_copied
from qcowlib.formats.qcow2.check_l1 import check_refcounts_l1
from qcowlib.formats.qcow2.check_l2 import L2Scanner
from qcowlib.formats.qcow2.check_refblocks import check_refblocks, compare_refcounts
from qcowlib.formats.qcow2.check_snapshots import (
    check_fix_snapshot_table,
    check_read_snapshot_table,
)
from qcowlib.formats.qcow2.checkstate import (
    BDRV_FIX_ERRORS,
    BDRV_FIX_LEAKS,
    EFBIG,
    EINVAL,
    EIO,
    INT_MAX,
    MAX_CHECK_CLUSTERS,
    CheckFailed,
    CheckState,
    Messages,
    Result,
    alt_hex,
)
from qcowlib.formats.qcow2.hostio import read_header
from qcowlib.formats.qcow2.imrt import Imrt, Recorder
from qcowlib.formats.qcow2.refcount_store import BDRV_MAX_LENGTH
from qcowlib.formats.qcow2.repair import rebuild_refcount_structure

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.hostio import HostIO

__all__ = ["BDRV_FIX_ERRORS", "BDRV_FIX_LEAKS", "check_image"]

#: QCOW_MAX_L1_SIZE: a snapshot L1 table larger than this is reported, not read.
QCOW_MAX_L1_SIZE: Final = hdr.MAX_L1_SIZE_BYTES


def check_image(host: HostIO, header: hdr.Header, path: str, fix: int) -> CheckReport:
    """img_check of a qcow2 image whose header was read with
    ``read_header(host, for_check=True)``: one pass, and a second read-only one if the
    repair fixed something.

    ``fix`` is 0 or a combination of :data:`BDRV_FIX_LEAKS` and :data:`BDRV_FIX_ERRORS`
    (then ``host`` is open for writing and locked).  Problems in the image are counted in
    the report; when the check cannot complete, the report says so in ``failure``.
    Raises :class:`~qcowlib.errors.QcowlibError` subclasses for I/O errors.
    """
    messages = Messages()
    try:
        first = _Pass(CheckState(host, header, messages, writable=bool(fix)))
        res = first.run(fix)
        repaired = bool(res.corruptions_fixed or res.leaks_fixed)
        if repaired:
            fixed = (res.corruptions_fixed, res.leaks_fixed)
            header = read_header(host, for_check=True)
            signaled = first.chk.signaled_corruption
            second = _Pass(CheckState(host, header, messages, signaled=signaled))
            res = second.run(0)
            res.corruptions_fixed, res.leaks_fixed = fixed
    except CheckFailed as exc:
        return CheckReport(path, "qcow2", failure=exc.text, messages=messages.lines())
    finally:
        if fix:
            host.sync()
    return CheckReport(
        filename=path,
        format="qcow2",
        check_errors=res.check_errors,
        corruptions=res.corruptions,
        leaks=res.leaks,
        corruptions_fixed=res.corruptions_fixed,
        leaks_fixed=res.leaks_fixed,
        image_end_offset=res.image_end_offset,
        total_clusters=res.total_clusters,
        allocated_clusters=res.allocated_clusters,
        fragmented_clusters=res.fragmented_clusters,
        compressed_clusters=res.compressed_clusters,
        repaired=repaired,
        messages=messages.lines(),
    )


class _Pass:
    """One check pass: qcow2_co_check_locked."""

    def __init__(self, chk: CheckState) -> None:
        self.chk = chk
        self.scanner = L2Scanner(chk)
        # The IMRT counts past the maximum before saturating, so it is at least 32 bits.
        self.imrt_dtype = np.uint64 if chk.refcount_order == 6 else np.uint32

    def run(self, fix: int) -> Result:
        """Raises :class:`CheckFailed` when QEMU returns an error."""
        chk = self.chk
        result = Result()
        snapshot_res = Result()
        try:
            check_read_snapshot_table(chk, snapshot_res, fix)
        except CheckFailed:
            result.add(snapshot_res, False)
            raise
        refcount_res = Result()
        try:
            self._check_refcounts(refcount_res, fix)
        finally:
            result.add(refcount_res, True)
        check_fix_snapshot_table(chk, snapshot_res, fix)
        result.add(snapshot_res, False)
        if fix and result.check_errors == 0 and result.corruptions == 0:
            chk.set_incompatible_features(
                chk.incompatible_features & ~(hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_CORRUPT)
            )
        return result

    def _check_refcounts(self, res: Result, fix: int) -> None:
        """qcow2_check_refcounts."""
        chk = self.chk
        cs = chk.cluster_size
        nb_clusters = -(-chk.host.size // cs)
        if nb_clusters > min(INT_MAX, MAX_CHECK_CLUSTERS):
            res.check_errors += 1
            raise CheckFailed(EFBIG)
        res.total_clusters = -(-(-(-chk.h.size // 512) * 512) // cs)
        imrt = Imrt(nb_clusters, self.imrt_dtype)
        rebuild = self._calculate_refcounts(res, fix, imrt)
        pre_compare_res = copy.copy(res)
        rebuild_cmp, highest = compare_refcounts(chk, res, 0, imrt)
        rebuild = rebuild or rebuild_cmp
        if rebuild and fix & BDRV_FIX_ERRORS:
            highest = self._rebuild(res, fix, imrt, highest)
        elif fix:
            if rebuild:
                chk.messages.add("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed(EIO)
            if res.leaks or res.corruptions:
                res.assign(pre_compare_res)
                _rebuild, highest = compare_refcounts(chk, res, fix, imrt)
        check_oflag_copied(chk, res, fix)
        res.image_end_offset = (highest + 1) * cs

    def _rebuild(self, res: Result, fix: int, imrt: Imrt, highest: int) -> int:
        """Rebuild the refcount structure and count again; returns the highest cluster."""
        chk = self.chk
        old_res = copy.copy(res)
        fresh_leaks = 0
        chk.messages.add("Rebuilding refcount structure")
        rebuild_refcount_structure(chk, res, imrt)
        res.corruptions = 0
        res.leaks = 0
        imrt.clear()
        rebuild = self._calculate_refcounts(res, 0, imrt)
        if fix & BDRV_FIX_LEAKS:
            saved_res = copy.copy(res)
            res.assign(Result())
            rebuild_cmp, highest = compare_refcounts(chk, res, BDRV_FIX_LEAKS, imrt)
            if rebuild or rebuild_cmp:
                chk.messages.add("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = res.leaks
            res.assign(saved_res)
        if res.corruptions < old_res.corruptions:
            res.corruptions_fixed += old_res.corruptions - res.corruptions
        if res.leaks < old_res.leaks:
            res.leaks_fixed += old_res.leaks - res.leaks
        res.leaks += fresh_leaks
        return highest

    def _calculate_refcounts(self, res: Result, fix: int, imrt: Imrt) -> bool:
        """calculate_refcounts: fill ``imrt``; returns whether a rebuild is needed."""
        chk = self.chk
        rec = Recorder(chk, res, imrt, self.scanner.rescan_refs)
        h = chk.h
        fixing = bool(fix & BDRV_FIX_ERRORS)
        try:
            rec.inc(0, chk.cluster_size)
            check_refcounts_l1(
                chk,
                self.scanner,
                rec,
                res,
                h.l1_table_offset,
                h.l1_size,
                frag=True,
                fixing=fixing,
                active=True,
            )
            self._snapshots_l1(rec, res, fixing)
            rec.inc(chk.snapshots_offset, chk.snapshots_size)
            rec.inc(chk.refcount_table_offset, chk.refcounts.table_entries * 8)
            if chk.crypto_length:
                rec.inc(chk.crypto_offset, chk.crypto_length)
            self._check_bitmaps_refcounts(rec, res)
        finally:
            rec.flush()
        return check_refblocks(chk, res, fix, imrt)

    def _snapshots_l1(self, rec: Recorder, res: Result, fixing: bool) -> None:
        """The snapshots' L1 tables, as calculate_refcounts visits them."""
        chk = self.chk
        if chk.has_data_file and chk.snapshots:
            rec.msg(f"ERROR {len(chk.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn in chk.snapshots:
            if sn.l1_table_offset & (chk.cluster_size - 1):
                rec.msg(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) "
                    f"l1_offset={alt_hex(sn.l1_table_offset)}: L1 table is not cluster "
                    "aligned; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
                rec.msg(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={alt_hex(sn.l1_size)}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            check_refcounts_l1(
                chk,
                self.scanner,
                rec,
                res,
                sn.l1_table_offset,
                sn.l1_size,
                frag=False,
                fixing=fixing,
                active=False,
            )

    def _check_bitmaps_refcounts(self, rec: Recorder, res: Result) -> None:
        """qcow2_check_bitmaps_refcounts."""
        chk = self.chk
        if not chk.nb_bitmaps:
            return
        size = chk.bitmap_directory_size
        rec.inc(chk.bitmap_directory_offset, size)
        bitmaps = None
        if 0 < size <= MAX_BITMAP_DIRECTORY_SIZE:
            data = chk.host.pread(chk.bitmap_directory_offset, size)
            bitmaps = bitmap_tables(data, chk.nb_bitmaps, chk.cluster_size, chk.h.size)
        if bitmaps is None:
            res.corruptions += 1
            raise CheckFailed(EINVAL)
        u = np.uint64
        for table_offset, table_size in bitmaps:
            rec.inc(table_offset, table_size * 8)
            if table_offset + table_size * 8 > BDRV_MAX_LENGTH:  # bitmap_table_load fails
                res.corruptions += 1
                raise CheckFailed(EIO)
            table = chk.read_table(table_offset, table_size)
            offsets = table & u(BME_TABLE_ENTRY_OFFSET_MASK)
            bad = (table & u(BME_TABLE_ENTRY_RESERVED_MASK)) != 0
            bad |= (offsets != 0) & (
                ((table & u(BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
                | ((offsets & u(chk.cluster_size - 1)) != 0)
            )
            if bad.any():  # bitmap_table_load fails
                res.corruptions += 1
                raise CheckFailed(EINVAL)
            rec.inc_clusters(offsets[offsets != 0].astype(np.int64))
