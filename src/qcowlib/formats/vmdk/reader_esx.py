"""Opening ESX sparse extents: COWD (``vmfsSparse``) and seSparse, as runs.

The reader (:mod:`qcowlib.formats.vmdk.reader`) hands over an extent file already
opened through the backing policy; this module reads its header, grain directory and
grain tables (each checked against the file size first, see
:mod:`~qcowlib.formats.vmdk.cowd` and :mod:`~qcowlib.formats.vmdk.sesparse`) and returns
the runs :func:`~qcowlib.formats.vmdk.mapping.table_runs` builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from qcowlib.errors import CorruptImage, TruncatedImage, UnsupportedFeature
from qcowlib.formats.vmdk import cowd, mapping, sesparse
from qcowlib.formats.vmdk.grains import decode_table
from qcowlib.formats.vmdk.header import SECTOR

if TYPE_CHECKING:
    from qcowlib.core.hostfile import HostFile

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

#: Grain-table entries decoded for one extent.  The map of an ESX extent is built whole
#: (about 40 bytes of arrays per entry), so this bounds its memory near 650 MiB: 16 Mi
#: grains, 8 GiB of a COWD extent with 512-byte grains, 64 GiB of a seSparse one.  A
#: crafted directory whose entries all name one table could otherwise ask for any size
#: within a sparse file.  Larger extents are refused (UnsupportedFeature), not mapped.
MAX_GRAIN_TABLE_ENTRIES: Final = 1 << 24


class GrainMap(NamedTuple):
    """A sparse extent's geometry and runs (first grain, kind, first grain's sector)."""

    capacity: int  # sectors
    grain_size: int  # sectors
    run_start: I64
    run_kind: U8
    run_sector: I64

    @property
    def num_grains(self) -> int:
        return -(-self.capacity // self.grain_size)


def _read_tables(
    host: HostFile, offsets: I64, gtes: int, gt_bytes: int, what: str, gd_offset: int
) -> bytes:
    """The grain tables at ``offsets`` (bytes) of ``gtes`` entries each, concatenated;
    each inside the file.

    More tables than the file can hold is a crafted directory, and more entries than
    :data:`MAX_GRAIN_TABLE_ENTRIES` more than the whole-map model holds: both refused
    before anything is read or allocated for them.
    """
    k = int(offsets.size)
    if k * gtes > MAX_GRAIN_TABLE_ENTRIES:
        raise UnsupportedFeature(
            f"{k} grain tables map more than {MAX_GRAIN_TABLE_ENTRIES} grains, the most "
            "qcowlib maps at once",
            structure=what,
            offset=gd_offset,
        )
    if k * gt_bytes > host.size:
        raise CorruptImage(
            f"{k} grain tables cannot fit a file of {host.size} bytes",
            structure=what,
            offset=gd_offset,
        )
    bad = np.flatnonzero(offsets + gt_bytes > host.size)
    if bad.size:
        raise TruncatedImage(
            f"grain table at {int(offsets[int(bad[0])]):#x} lies past the end of the file",
            structure=what,
            offset=gd_offset,
        )
    if k and bool(np.all(np.diff(offsets) == gt_bytes)):
        return host.pread(int(offsets[0]), k * gt_bytes)  # back to back: one read
    return b"".join(host.pread(int(off), gt_bytes) for off in offsets.tolist())


def _checked(m: GrainMap, host: HostFile, strict: bool) -> GrainMap:
    """Refuse (``strict``) a data grain at or past the end of the file."""
    if not strict:
        return m
    bad = mapping.first_bad_grain(
        m.run_start,
        m.run_kind,
        m.run_sector,
        n_grains=m.num_grains,
        grain_size=m.grain_size,
        file_size=host.size,
    )
    if bad is not None and not bad[1]:
        raise TruncatedImage(
            f"grain {bad[0]} lies past the end of the file", structure="vmdk grain table"
        )
    return m


def open_cowd(host: HostFile, *, strict: bool = True) -> tuple[cowd.CowdHeader, GrainMap]:
    """Header and runs of the COWD extent ``host`` (QEMU's ``vmdk_open_vmfs_sparse``).

    Raises :class:`~qcowlib.errors.FormatError` subclasses for a bad header, directory
    or table, and (``strict``) for a grain past the end of the file.
    """
    h = cowd.parse_cowd_header(host.pread(0, cowd.COWD_HEADER_SIZE), host.size)
    gd_at, gd_len = h.gd_range
    what = "vmdk cowd grain directory"
    gd = decode_table(host.pread_exact(gd_at, gd_len, what), h.l1dir_size, what=what, offset=gd_at)
    gtes = cowd.COWD_GTES_PER_GT
    gd = gd[: -(-h.num_grains // gtes)]  # entries past the capacity are never read
    state = np.where(gd != 0, mapping.GD_TABLE, mapping.GD_UNALLOC).astype(np.uint8)
    offsets = gd[gd != 0].astype(np.int64) * SECTOR
    raw = _read_tables(host, offsets, gtes, gtes * 4, what, gd_at)
    entries = decode_table(raw, offsets.size * gtes, offset=int(offsets[0]) if offsets.size else 0)
    kind = np.where(entries == 0, mapping.RUN_UNALLOC, mapping.RUN_DATA).astype(np.uint8)
    runs = mapping.table_runs(
        state,
        kind,
        entries.astype(np.int64),
        gtes=gtes,
        n_grains=h.num_grains,
        grain_size=h.granularity,
    )
    return h, _checked(GrainMap(h.disk_sectors, h.granularity, *runs), host, strict)


def open_sesparse(
    host: HostFile, *, strict: bool = True
) -> tuple[sesparse.SeSparseConstHeader, GrainMap]:
    """Const header and runs of the seSparse extent ``host`` (``vmdk_open_se_sparse``).

    Raises :class:`~qcowlib.errors.FormatError` subclasses or
    :class:`~qcowlib.errors.UnsupportedFeature` (what QEMU refuses, with its messages).
    """
    h = sesparse.parse_const_header(host.pread(0, SECTOR), host.size)
    vh_at = h.volatile_header_offset * SECTOR
    sesparse.parse_volatile_header(
        host.pread_exact(vh_at, SECTOR, "vmdk sesparse volatile header"), offset=vh_at
    )
    what = "vmdk sesparse grain directory"
    gd_at, gd_len = h.gd_range
    gd = sesparse.decode_entries(
        host.pread_exact(gd_at, gd_len, what), h.num_gd_entries, what=what, offset=gd_at
    )
    gtes = sesparse.SESPARSE_GTES_PER_GT
    gd = gd[: -(-h.num_grains // gtes)]
    state, gt_sector = sesparse.directory_tables(gd, h)
    offsets = gt_sector[state == mapping.GD_TABLE] * SECTOR
    raw = _read_tables(host, offsets, gtes, gtes * 8, what, gd_at)
    entries = sesparse.decode_entries(
        raw, offsets.size * gtes, what="vmdk sesparse grain table", offset=0
    )
    kind, sector = sesparse.grain_entries(entries, h)
    runs = mapping.table_runs(
        state, kind, sector, gtes=gtes, n_grains=h.num_grains, grain_size=h.grain_size
    )
    return h, _checked(GrainMap(h.capacity, h.grain_size, *runs), host, strict)
