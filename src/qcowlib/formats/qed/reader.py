"""QED images, opened read-only.

The header is read and checked on open (:func:`qcowlib.formats.qed.codec.parse_header`);
the L1 table is read the first time the image is mapped or read (``info`` needs only
the header), and L2 tables as their range is asked for, each validated whole with numpy
and kept in a small cache.

``QED_F_NEED_CHECK`` (the image was not closed cleanly) is kept in :attr:`QedDisk.header`;
``info`` shows ``dirty-flag`` false as qemu-img 7.2 does (see :meth:`QedDisk.info_tail`),
and ``check -r`` clears it as QEMU does.  Reading such an image is safe (QEMU repairs
it only when it opens it read-write, which qcowlib never does while reading).  A
backing file is named in the header cluster; ``QED_F_BACKING_FORMAT_NO_PROBE`` records
that it is raw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcowlib.core.disk import full_backing_filename
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, QcowlibError
from qcowlib.formats._clustermap import (
    MAX_MAP_CLUSTERS,
    ClusterMap,
    ClusterMapDisk,
    read_backing_name,
    read_tables,
)
from qcowlib.formats._clustermap import read_header as _read_header
from qcowlib.formats.qed import codec as qed

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.formats.qed.codec import U64


def read_header(host: HostFile) -> tuple[qed.QedHeader, str | None]:
    """The checked header of a QED file and its backing file name (if it has one)."""
    header = _read_header(host, qed.HEADER_SIZE, qed.parse_header, "QED", qed.HEADER.what)
    name = None
    if header.has_backing_file:
        name = read_backing_name(host, header.backing_filename_offset, header.backing_filename_size)
    return header, name


class QedDisk(ClusterMapDisk):
    """A QED image (one layer).

    Raises :class:`qcowlib.errors.FormatError` subclasses for a bad header or table
    entry (naming the field and its offset) and :class:`UnsupportedFeature` for unknown
    feature bits.
    """

    format = "qed"

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename
        self.header, self._backing_name = read_header(host)
        self.virtual_size = self.header.image_size
        self.cluster_size = self.header.cluster_size
        self._l1: U64 | None = None

    # -- links and info -----------------------------------------------------------------
    @property
    def backing_file_name(self) -> str | None:
        return self._backing_name

    @property
    def backing_file_format(self) -> str | None:
        return "raw" if self.header.backing_is_raw else None

    def info_head(self) -> dict[str, Any]:
        return {"backing-filename-format": "raw"} if self.header.backing_is_raw else {}

    @property
    def info_cluster_size(self) -> int | None:
        return self.cluster_size

    def info_tail(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self._backing_name is not None:
            info["full-backing-filename"] = full_backing_filename(self.filename, self._backing_name)
            info["backing-filename"] = self._backing_name
        # QEMU reports QED_F_NEED_CHECK as the dirty flag, but draining the freshly
        # opened image fires its need-check timer, which clears the flag in memory (the
        # read-only file keeps it) before qemu-img asks: qemu-img info always says false.
        info["dirty-flag"] = False
        return info

    # -- tables -------------------------------------------------------------------------
    @property
    def l1_table(self) -> U64:
        """The L1 table (read on first use)."""
        if self._l1 is None:
            h = self.header
            raw = self.host.pread_exact(h.l1_table_offset, h.table_bytes, "qed l1 table")
            try:
                self._l1 = qed.decode_table(raw, h, h.l1_table_offset)
            except QcowlibError as exc:
                raise exc.with_file(self.filename) from None
        return self._l1

    def _cluster_map(self, first: int, end: int) -> ClusterMap:
        """Every L2 table from the one that maps cluster ``first`` to the one that maps
        cluster ``end - 1`` (at most about :data:`MAX_MAP_CLUSTERS` clusters), decoded
        together; tables the L1 table does not point at are left out (unallocated)."""
        import numpy as np

        h = self.header
        n = h.table_nelems
        t0 = first // n
        if t0 >= self.l1_table.size:  # pragma: no cover - image_size is capped by L1
            return ClusterMap.unallocated(first, end)
        t1 = min((end - 1) // n, t0 + max(1, MAX_MAP_CLUSTERS // n) - 1, self.l1_table.size - 1)
        l1 = self.l1_table[t0 : t1 + 1]
        present = np.flatnonzero(l1)
        offsets = l1[present]
        bad = np.flatnonzero(~qed.valid_table_offsets(h, offsets))
        if bad.size:
            index = t0 + int(present[bad[0]])
            raise CorruptImage(
                f"QED L1 entry {index} points to invalid L2 table offset {int(offsets[bad[0]]):#x}",
                file=self.filename,
                structure="qed l1 table",
                field=f"entry[{index}]",
                offset=h.l1_table_offset + 8 * index,
            )
        tables = offsets.astype(np.int64).tolist()
        raw = read_tables(self.host, tables, h.table_bytes, "qed l2 table")
        try:
            l2 = qed.decode_table(raw, h, tables[0] if tables else 0, len(tables))
            kind, host = qed.classify_l2(h, l2.reshape(len(tables), n), tables)
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
        clusters = ((present + t0) * n)[:, None] + np.arange(n, dtype=np.int64)
        return ClusterMap(
            t0 * n, (t1 + 1) * n, clusters.reshape(-1), kind.reshape(-1), host.reshape(-1)
        )


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> QedDisk:
    """The registry's opener."""
    return QedDisk(host, path)
