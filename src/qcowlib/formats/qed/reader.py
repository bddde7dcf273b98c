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

import threading
from typing import TYPE_CHECKING, Any

from qcowlib.core.disk import full_backing_filename
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, QcowlibError, TruncatedImage
from qcowlib.formats._clustermap import ClusterMap, ClusterMapDisk
from qcowlib.formats.qed import codec as qed

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.formats.qed.codec import I64, U8, U64

#: L2 tables kept decoded per image (each maps ``table_nelems`` clusters).
L2_CACHE_ENTRIES = 64


def read_header(host: HostFile) -> tuple[qed.QedHeader, str | None]:
    """The checked header of a QED file and its backing file name (if it has one)."""
    if host.size < qed.HEADER_SIZE:
        raise TruncatedImage("QED header is truncated", file=host.path, structure="qed header")
    try:
        header = qed.parse_header(host.pread(0, qed.HEADER_SIZE), host.size)
    except QcowlibError as exc:
        raise exc.with_file(host.path) from None
    name = None
    if header.has_backing_file:
        raw = host.pread(header.backing_filename_offset, header.backing_filename_size)
        name = qed.decode_backing_name(raw)
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
        self._l2: dict[int, tuple[U8, I64]] = {}
        self._lock = threading.Lock()

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

    def read_table(self, offset: int, what: str) -> U64:
        """The table at ``offset`` (inside the file: checked by the caller)."""
        raw = self.host.pread_exact(offset, self.header.table_bytes, what)
        return qed.decode_table(raw, self.header, offset)

    def _l2_map(self, index: int) -> tuple[U8, I64] | None:
        """Kinds and host offsets of L1 entry ``index``'s L2 table (None: no table)."""
        h = self.header
        l2_offset = int(self.l1_table[index])
        if l2_offset == 0:
            return None
        if not qed.check_table_offset(h, l2_offset):
            raise CorruptImage(
                f"QED L1 entry {index} points to invalid L2 table offset {l2_offset:#x}",
                file=self.filename,
                structure="qed l1 table",
                field=f"entry[{index}]",
                offset=h.l1_table_offset + 8 * index,
            )
        with self._lock:
            cached = self._l2.get(l2_offset)
        if cached is not None:
            return cached
        try:
            decoded = qed.classify_l2(h, self.read_table(l2_offset, "qed l2 table"), l2_offset)
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
        with self._lock:
            if len(self._l2) >= L2_CACHE_ENTRIES:
                self._l2.clear()
            self._l2[l2_offset] = decoded
        return decoded

    def _chunk_end(self, first: int, end: int) -> int:
        n = self.header.table_nelems
        return min(end, (first // n + 1) * n)

    def _cluster_map(self, first: int, end: int) -> ClusterMap:
        n = self.header.table_nelems
        index, lo = divmod(first, n)
        hi = lo + (end - first)
        decoded = self._l2_map(index)
        if decoded is None:
            return ClusterMap.unallocated(first, end - first)
        kind, host = decoded
        return ClusterMap(first, kind[lo:hi], host[lo:hi])

    def runs_data_file(self) -> HostFile | None:
        return self.host


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> QedDisk:
    """The registry's opener."""
    return QedDisk(host, path)
