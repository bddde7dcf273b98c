"""Legacy QCOW (version 1) images, opened read-only.

The header is read and checked on open (:func:`qcowlib.formats.qcow.codec.parse_header`);
the L1 table when the image is first mapped or read, L2 tables as their range is asked
for.  Compressed clusters are inflated one at a time (the last one is kept, as QEMU
keeps it).  Encrypted images (``crypt_method`` 1, AES-CBC) are refused with an error
that says so.  A backing file is named in the header, without a format: it is probed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from qcowlib.core.disk import Extent, ExtentKind, full_backing_filename
from qcowlib.core.hostfile import HostFile
from qcowlib.core.qdict import qdict_order
from qcowlib.errors import QcowlibError, TruncatedImage, UnsupportedFeature
from qcowlib.formats._clustermap import (
    MAX_MAP_CLUSTERS,
    ClusterMap,
    ClusterMapDisk,
    read_backing_name,
    read_tables,
)
from qcowlib.formats._clustermap import read_header as _read_header
from qcowlib.formats.qcow import codec as qcow

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.formats.qcow.codec import U64

#: The L1 table is read in pieces of this many entries (QEMU allows 2 GiB of L1 table;
#: a map or read only ever needs the piece it is in), at most this many pieces kept.
L1_PIECE_ENTRIES = 1 << 16
L1_PIECES_KEPT = 64


def read_header(host: HostFile) -> tuple[qcow.QcowHeader, str | None]:
    """The checked header of a qcow v1 file and its backing file name (if any)."""
    header = _read_header(host, qcow.HEADER_SIZE, qcow.parse_header, "qcow", qcow.HEADER.what)
    name = None
    if header.has_backing_file:
        name = read_backing_name(host, header.backing_file_offset, header.backing_file_size)
    return header, name


class QcowDisk(ClusterMapDisk):
    """A qcow (v1) image (one layer).

    Raises :class:`qcowlib.errors.FormatError` subclasses for a bad header or table
    entry and :class:`UnsupportedFeature` for encrypted images.
    """

    format = "qcow"

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename
        self.header, self._backing_name = read_header(host)
        self.virtual_size = self.header.virtual_size
        self.cluster_size = self.header.cluster_size
        self._l1: dict[int, U64] = {}
        self._lock = threading.Lock()
        self._cluster: tuple[int, bytes] | None = None
        #: AES-CBC (crypt_method 1): ``info`` shows it, as qemu-img does; data needs a key
        #: qcowlib does not take for this legacy cipher.
        self.encrypted = self.header.crypt_method == qcow.QCOW_CRYPT_AES

    # -- links and info -----------------------------------------------------------------
    @property
    def backing_file_name(self) -> str | None:
        return self._backing_name

    @property
    def info_cluster_size(self) -> int | None:
        return self.cluster_size

    def info_tail(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self._backing_name is not None:
            info["full-backing-filename"] = full_backing_filename(self.filename, self._backing_name)
            info["backing-filename"] = self._backing_name
        if self.encrypted:
            info["encrypted"] = True
        info["dirty-flag"] = False
        return qdict_order(info)

    def _check_readable(self) -> None:
        if self.encrypted:
            raise UnsupportedFeature(
                "Parameter 'encrypt.key-secret' is required for cipher: this qcow image is "
                "encrypted with AES-CBC (crypt_method 1), which qcowlib does not decrypt; "
                "qemu-img convert --object secret,... --image-opts can",
                file=self.filename,
            )

    # -- tables -------------------------------------------------------------------------
    def l1_piece(self, piece: int) -> U64:
        """Entries ``[piece * L1_PIECE_ENTRIES, ...)`` of the L1 table (read on first
        use; the table lies inside the file: checked on open)."""
        with self._lock:
            entries = self._l1.get(piece)
        if entries is None:
            h = self.header
            first = piece * L1_PIECE_ENTRIES
            n = min(L1_PIECE_ENTRIES, h.l1_size - first)
            offset = h.l1_table_offset + first * 8
            raw = self.host.pread_exact(offset, n * 8, "qcow l1 table")
            entries = qcow.decode_table(raw, n, offset)
            with self._lock:
                if len(self._l1) >= L1_PIECES_KEPT:
                    self._l1.clear()
                self._l1[piece] = entries
        return entries

    def _cluster_map(self, first: int, end: int) -> ClusterMap:
        """Every L2 table from the one that maps cluster ``first`` to the one that maps
        cluster ``end - 1`` (within one piece of the L1 table, at most about
        :data:`MAX_MAP_CLUSTERS` clusters), decoded together; tables the L1 table does
        not point at are left out (unallocated)."""
        import numpy as np

        h = self.header
        bits, n = h.l2_bits, h.l2_size
        t0 = first >> bits
        piece, at = divmod(t0, L1_PIECE_ENTRIES)
        if t0 >= h.l1_size:  # pragma: no cover - the L1 table covers the disk
            return ClusterMap.unallocated(first, end)
        l1 = self.l1_piece(piece)
        t1 = min((end - 1) >> bits, t0 + max(1, MAX_MAP_CLUSTERS >> bits) - 1)
        t1 = min(t1, piece * L1_PIECE_ENTRIES + l1.size - 1)
        l1 = l1[at : at + t1 - t0 + 1]
        present = np.flatnonzero(l1)
        offsets = l1[present]
        table_bytes = n * 8
        last = self.host.size - table_bytes  # the last offset a table fits at
        bad = np.flatnonzero(offsets > np.uint64(last)) if last >= 0 else np.arange(offsets.size)
        if bad.size:
            index = t0 + int(present[bad[0]])
            raise TruncatedImage(
                f"qcow L2 table at {int(offsets[bad[0]]):#x} ({table_bytes} bytes) is past "
                "the end of the file",
                file=self.filename,
                structure="qcow l1 table",
                field=f"entry[{index}]",
                offset=h.l1_table_offset + 8 * index,
            )
        tables = offsets.astype(np.int64).tolist()
        raw = read_tables(self.host, tables, table_bytes, "qcow l2 table")
        try:
            l2 = qcow.decode_table(raw, len(tables) * n, tables[0] if tables else 0)
            kind, host, clen = qcow.classify_l2(
                h, l2.reshape(len(tables), n), tables, self.host.size
            )
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
        clusters = ((present + t0) << bits)[:, None] + np.arange(n, dtype=np.int64)
        return ClusterMap(
            t0 << bits,
            (t1 + 1) << bits,
            clusters.reshape(-1),
            kind.reshape(-1),
            host.reshape(-1),
            clen.reshape(-1),
        )

    # -- reads --------------------------------------------------------------------------
    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        assert ext.host_offset is not None
        if ext.kind is not ExtentKind.COMPRESSED:
            self.host.pread_into(ext.host_offset, buf)
            return
        cs = self.cluster_size
        at = ext.start % cs
        data = self._inflate(ext.host_offset, ext.compressed_length)
        buf[:] = data[at : at + len(buf)]

    def _inflate(self, offset: int, csize: int) -> bytes:
        with self._lock:
            cached = self._cluster
        if cached is not None and cached[0] == offset:
            return cached[1]
        raw = self.host.pread(offset, csize)
        try:
            data = qcow.decompress(raw, self.cluster_size, offset)
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
        with self._lock:
            self._cluster = (offset, data)
        return data


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> QcowDisk:
    """The registry's opener."""
    return QcowDisk(host, path)
