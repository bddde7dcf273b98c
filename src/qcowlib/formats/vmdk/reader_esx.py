"""Opening ESX sparse extents: COWD (``vmfsSparse``) and seSparse, as windowed maps.

The reader (:mod:`qcowlib.formats.vmdk.reader`) hands over an extent file already
opened through the backing policy; this module reads and checks its header (see
:mod:`~qcowlib.formats.vmdk.cowd` and :mod:`~qcowlib.formats.vmdk.sesparse`) and returns
a :class:`~qcowlib.formats.vmdk.grainmap.GrainTables` that decodes its grain directory
and grain tables a window at a time, so that an extent of any size (an ESXi snapshot
delta of a large disk has millions of 512-byte grains) maps in bounded memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.formats.vmdk import cowd, mapping, sesparse
from qcowlib.formats.vmdk.grainmap import MAX_WINDOW_ENTRIES, Geometry, GrainTables
from qcowlib.formats.vmdk.grains import decode_table
from qcowlib.formats.vmdk.header import SECTOR

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from qcowlib.core.hostfile import HostFile

    I64 = npt.NDArray[np.int64]
    U8 = npt.NDArray[np.uint8]


class CowdTables(GrainTables):
    """A COWD grain map: uint32 directory entries (a table's sector, 0: none) and grain
    table entries (a grain's sector, 0: unallocated)."""

    def _directory(self, raw: bytes) -> tuple[U8, I64]:
        import numpy as np

        gd = decode_table(raw, len(raw) // 4, what=self.geometry.what)
        state = np.where(gd != 0, mapping.GD_TABLE, mapping.GD_UNALLOC).astype(np.uint8)
        return state, gd.astype(np.int64) * SECTOR

    def _entries(self, raw: bytearray, count: int) -> tuple[U8, I64]:
        import numpy as np

        gt = decode_table(raw, count).astype(np.int64)
        return np.where(gt == 0, mapping.RUN_UNALLOC, mapping.RUN_DATA).astype(np.uint8), gt


class SeSparseTables(GrainTables):
    """A seSparse grain map: uint64 directory and grain table entries, decoded by
    :mod:`~qcowlib.formats.vmdk.sesparse`."""

    def __init__(
        self,
        host: HostFile,
        filename: str,
        h: sesparse.SeSparseConstHeader,
        *,
        strict: bool = True,
        window: int = MAX_WINDOW_ENTRIES,
    ) -> None:
        self.header = h
        gd_at, _ = h.gd_range
        gtes = sesparse.SESPARSE_GTES_PER_GT
        entries = min(h.num_gd_entries, -(-h.num_grains // gtes))
        what = "vmdk sesparse grain directory"
        geometry = Geometry(gd_at, entries, 8, gtes, gtes * 8, h.grain_size, h.num_grains, what)
        super().__init__(host, filename, geometry, strict=strict, window=window)

    def _directory(self, raw: bytes) -> tuple[U8, I64]:
        g = self.geometry
        gd = sesparse.decode_entries(raw, len(raw) // 8, what=g.what, offset=g.gd_offset)
        state, sector = sesparse.directory_tables(gd, self.header)
        return state, sector * SECTOR

    def _entries(self, raw: bytearray, count: int) -> tuple[U8, I64]:
        gt = sesparse.decode_entries(raw, count, what="vmdk sesparse grain table", offset=0)
        return sesparse.grain_entries(gt, self.header)


def open_cowd(
    host: HostFile, filename: str, *, strict: bool = True
) -> tuple[cowd.CowdHeader, CowdTables]:
    """Header and grain map of the COWD extent ``host`` (QEMU's
    ``vmdk_open_vmfs_sparse``).

    Raises :class:`~qcowlib.errors.FormatError` subclasses for a bad header or
    directory; the map raises them for a bad table and (``strict``) a grain past the
    end of the file when a read or ``map`` reaches it.
    """
    h = cowd.parse_cowd_header(host.pread(0, cowd.COWD_HEADER_SIZE), host.size)
    gd_at, _ = h.gd_range
    gtes = cowd.COWD_GTES_PER_GT
    # Entries past the capacity are never read.
    entries = min(h.l1dir_size, -(-h.num_grains // gtes))
    what = "vmdk cowd grain directory"
    geometry = Geometry(gd_at, entries, 4, gtes, gtes * 4, h.granularity, h.num_grains, what)
    return h, CowdTables(host, filename, geometry, strict=strict)


def open_sesparse(
    host: HostFile, filename: str, *, strict: bool = True
) -> tuple[sesparse.SeSparseConstHeader, SeSparseTables]:
    """Const header and grain map of the seSparse extent ``host``
    (``vmdk_open_se_sparse``).

    Raises :class:`~qcowlib.errors.FormatError` subclasses or
    :class:`~qcowlib.errors.UnsupportedFeature` (what QEMU refuses, with its messages).
    """
    h = sesparse.parse_const_header(host.pread(0, SECTOR), host.size)
    vh_at = h.volatile_header_offset * SECTOR
    sesparse.parse_volatile_header(
        host.pread_exact(vh_at, SECTOR, "vmdk sesparse volatile header"), offset=vh_at
    )
    return h, SeSparseTables(host, filename, h, strict=strict)
