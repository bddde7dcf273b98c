"""Hosted sparse extents (``KDMV``: monolithicSparse, streamOptimized,
twoGbMaxExtentSparse): the grain directory and grain tables read and checked whole on
open, and turned into runs (:mod:`qcowlib.formats.vmdk.mapping`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qcowlib.formats.vmdk import codec as vmdk
from qcowlib.formats.vmdk import mapping

if TYPE_CHECKING:
    from qcowlib.core.hostfile import HostFile

_UNALLOC, _ZERO, _DATA = mapping.RUN_UNALLOC, mapping.RUN_ZERO, mapping.RUN_DATA
_COMPRESSED = mapping.RUN_COMPRESSED


def read_runs(
    host: HostFile, h: vmdk.SparseExtentHeader, *, strict: bool = True
) -> mapping.GrainRuns:
    """Read the grain directory and tables of a sparse extent and turn them into runs."""
    gd_at, gd_len = vmdk.grain_directory_extent(h)
    gd = vmdk.decode_table(
        host.pread_exact(gd_at, gd_len, "vmdk grain directory"),
        h.num_gd_entries,
        what="grain directory",
        offset=gd_at,
    )
    gtes = h.num_gtes_per_gt
    gt_bytes = h.gt_bytes
    offsets = vmdk.grain_table_offsets(gd, h, host.size, gd_at)
    k = int(offsets.size)
    if k and bool(np.all(np.diff(offsets) == gt_bytes)):
        # QEMU and VMware write the tables back to back: one read.
        first = int(offsets[0])
        raw = host.pread(first, k * gt_bytes)
        tables = vmdk.decode_table(raw, k * gtes, offset=first)
    else:
        tables = np.empty(k * gtes, dtype=np.uint32)
        for r, off in enumerate(offsets.tolist()):
            tables[r * gtes : (r + 1) * gtes] = vmdk.decode_table(
                host.pread(off, gt_bytes), gtes, offset=off
            )
    return grain_runs(gd, tables, h, host.size, strict=strict)


def grain_runs(
    gd: vmdk.U32,
    tables: vmdk.U32,
    h: vmdk.SparseExtentHeader,
    file_size: int,
    *,
    strict: bool = True,
) -> mapping.GrainRuns:
    """Runs of a hosted sparse extent (:func:`~qcowlib.formats.vmdk.mapping.table_runs`).

    ``tables`` holds the entries of the allocated grain tables, in directory order: a
    grain's sector, 0 (unallocated) or 1 (zeroed), compressed grains in a compressed
    extent.  Raises :class:`TruncatedImage` (``strict``) for a grain past the end of
    the file.
    """
    if strict:
        vmdk.check_grain_tables(gd, tables, h, file_size)
    value = tables.astype(np.int64)
    kind = np.full(value.size, _COMPRESSED if h.compressed else _DATA, dtype=np.uint8)
    kind[value == 0] = _UNALLOC
    kind[value == vmdk.GTE_ZEROED] = _ZERO
    state = np.where(gd != 0, mapping.GD_TABLE, mapping.GD_UNALLOC).astype(np.uint8)
    return mapping.table_runs(
        state,
        kind,
        value,
        gtes=h.num_gtes_per_gt,
        n_grains=h.num_grains,
        grain_size=h.grain_size,
    )
