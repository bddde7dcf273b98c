"""Legacy QCOW (version 1) images, opened read-only.

The header is read and checked on open (:func:`qcowlib.formats.qcow.codec.parse_header`);
the L1 table when the image is first mapped or read, L2 tables as their range is asked
for.  Compressed clusters are inflated one at a time (the last one is kept, as QEMU
keeps it).  Encrypted images (``crypt_method`` 1, AES-CBC) are refused with an error
that says so.  A backing file is named in the header, without a format: it is probed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qcowlib.core.disk import Extent, ExtentKind, full_backing_filename
from qcowlib.core.hostfile import HostFile
from qcowlib.core.qdict import qdict_order
from qcowlib.errors import QcowlibError, TruncatedImage, UnsupportedFeature
from qcowlib.formats._clustermap import ClusterMap, ClusterMapDisk
from qcowlib.formats.qcow import codec as qcow

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.formats.qcow.codec import I64, U8, U64

#: L2 tables kept decoded per image.
L2_CACHE_ENTRIES = 256
#: The L1 table is read in pieces of this many entries (QEMU allows 2 GiB of L1 table;
#: a map or read only ever needs the piece it is in), at most this many pieces kept.
L1_PIECE_ENTRIES = 1 << 16
L1_PIECES_KEPT = 64


def read_header(host: HostFile) -> tuple[qcow.QcowHeader, str | None]:
    """The checked header of a qcow v1 file and its backing file name (if any)."""
    if host.size < qcow.HEADER_SIZE:
        raise TruncatedImage("qcow header is truncated", file=host.path, structure="qcow header")
    try:
        header = qcow.parse_header(host.pread(0, qcow.HEADER_SIZE), host.size)
    except QcowlibError as exc:
        raise exc.with_file(host.path) from None
    name = None
    if header.has_backing_file:
        raw = host.pread(header.backing_file_offset, header.backing_file_size)
        name = qcow.decode_backing_name(raw)
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
        self._l2: dict[int, tuple[U8, I64, I64]] = {}
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

    def _runs(self, start: int, end: int) -> Iterator[Extent]:
        if self.encrypted:
            raise UnsupportedFeature(
                "Parameter 'encrypt.key-secret' is required for cipher: this qcow image is "
                "encrypted with AES-CBC (crypt_method 1), which qcowlib does not decrypt; "
                "qemu-img convert --object secret,... --image-opts can",
                file=self.filename,
            )
        return super()._runs(start, end)

    # -- tables -------------------------------------------------------------------------
    def l1_entry(self, index: int) -> int:
        """L1 entry ``index`` (its piece of the table is read on first use; the table
        lies inside the file: checked on open)."""
        piece, at = divmod(index, L1_PIECE_ENTRIES)
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
        return int(entries[at])

    def _l2_map(self, index: int) -> tuple[U8, I64, I64] | None:
        l2_offset = self.l1_entry(index)
        if l2_offset == 0:
            return None
        with self._lock:
            cached = self._l2.get(l2_offset)
        if cached is not None:
            return cached
        h = self.header
        try:
            raw = self.host.pread_exact(l2_offset, h.l2_size * 8, "qcow l2 table")
            l2 = qcow.decode_table(raw, h.l2_size, l2_offset)
            decoded = qcow.classify_l2(h, l2, l2_offset, self.host.size)
        except QcowlibError as exc:
            if exc.field is None:
                exc.structure, exc.field = "qcow l1 table", f"entry[{index}]"
                exc.offset = h.l1_table_offset + 8 * index
            raise exc.with_file(self.filename) from None
        with self._lock:
            if len(self._l2) >= L2_CACHE_ENTRIES:
                self._l2.clear()
            self._l2[l2_offset] = decoded
        return decoded

    def _chunk_end(self, first: int, end: int) -> int:
        n = self.header.l2_size
        return min(end, (first // n + 1) * n)

    def _cluster_map(self, first: int, end: int) -> ClusterMap:
        n = self.header.l2_size
        index, lo = divmod(first, n)
        hi = lo + (end - first)
        decoded = self._l2_map(index)
        if decoded is None:
            return ClusterMap.unallocated(first, end - first)
        kind, host, clen = decoded
        return ClusterMap(first, kind[lo:hi], host[lo:hi], clen[lo:hi])

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

    def runs_data_file(self) -> HostFile | None:
        return self.host


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> QcowDisk:
    """The registry's opener."""
    return QcowDisk(host, path)
