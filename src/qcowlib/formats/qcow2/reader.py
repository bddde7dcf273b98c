"""qcow2 images: header, L1 table, a bounded cache of decoded L2 tables, reads.

Everything read from the file is validated before use: table offsets and sizes against
the file size and the caps in :mod:`qcowlib.formats.qcow2.header`, L2 entries by the
table codec.  Reads go through extents, so a long run of contiguous clusters is one
``preadv``.
"""

from __future__ import annotations

import _thread
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qcowlib.core.disk import (
    RUN_COMPRESSED,
    RUN_DATA,
    RUN_KINDS,
    Disk,
    Extent,
    ExtentKind,
    Runs,
    full_backing_filename,
)
from qcowlib.core.hostfile import HostFile
from qcowlib.core.qdict import qdict_order
from qcowlib.errors import (
    InvalidArgument,
    QcowlibError,
    TruncatedImage,
)
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2 import hostio
from qcowlib.formats.qcow2.metadata_read import Qcow2Metadata
from qcowlib.formats.qcow2.reader_plain import PLAIN_L2_BYTES, PlainL2Mixin
from qcowlib.formats.qcow2.tables_plain import l1_check_aligned

if TYPE_CHECKING:
    import numpy as np

    from qcowlib.core.chain import BackingPolicy
    from qcowlib.formats.luks.codec import LuksHeader
    from qcowlib.formats.qcow2 import tables
    from qcowlib.formats.qcow2.bitmap import BitmapEntry
    from qcowlib.formats.qcow2.encryption import ClusterCipher
    from qcowlib.formats.qcow2.snapshot import Snapshot
    from qcowlib.formats.qcow2.tables_plain import PlainL2Runs

# numpy and the table codecs load on the first mapping or read, not for ``info``: a
# header read must not pay ~50 ms of imports (DESIGN.md, "metadata-only commands").
# Mapping a small range does not load them either (reader_plain.py).

#: Decoded L2 tables kept per image (bytes of raw table they stand for).
L2_CACHE_BYTES = 32 * 1024 * 1024
#: What a decoded table costs beyond its entries (five small arrays and their record):
#: with 512-byte clusters that is most of it, so the cache counts it.
L2_RUNS_OVERHEAD = 1536
#: L1 tables up to this size are checked for misaligned entries without numpy.
_L1_PLAIN_CHECK_BYTES = 256 * 1024


def _l1_to_offsets(raw_l1: bytes, cluster_size: int) -> tables.U64:
    from qcowlib.formats.qcow2 import tables

    return tables.l1_offsets(tables.decode_table(raw_l1), cluster_size)


def read_header(host: HostFile) -> hdr.Header:
    """Read and parse the header of a qcow2 file (first cluster)."""
    return hostio.read_header(host)


class Qcow2Disk(PlainL2Mixin, Qcow2Metadata, Disk):
    """A qcow2 image opened read-only (see :func:`qcowlib.formats.opener.open_disk`)."""

    format = "qcow2"

    def __init__(
        self,
        host: HostFile,
        filename: str,
        header: hdr.Header,
        data_file: HostFile | None = None,
        data_filename: str | None = None,
    ) -> None:
        self.host = host
        self.filename = filename
        self.header = header
        self.virtual_size = header.size
        self.data_host = data_file if data_file is not None else host
        self.data_filename = data_filename if data_file is not None else filename
        h = header
        self.luks: LuksHeader | None = None
        self._cipher: ClusterCipher | None = None
        if h.crypt_method != hdr.CRYPT_NONE:
            from qcowlib.formats.qcow2.encryption import open_encryption

            self.luks, self._cipher = open_encryption(host, h, filename)
            self.encrypted = True
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.extended_l2 = h.extended_l2
        self.unit_size = self.cluster_size // h.subclusters_per_cluster
        self.l2_entries = h.l2_size
        self.l2_span = self.l2_entries * self.cluster_size
        raw_l1 = (
            host.pread_exact(h.l1_table_offset, h.l1_size * 8, "L1 table") if h.l1_size else b""
        )
        self._raw_l1 = raw_l1
        self._l2_offsets: tables.U64 | None = None
        # A bad entry is an error at open: a small table is checked without numpy.
        if len(raw_l1) > _L1_PLAIN_CHECK_BYTES:
            _ = self.l2_offsets
        else:
            try:
                l1_check_aligned(raw_l1, h.cluster_size)
            except QcowlibError as exc:
                raise exc.with_file(filename) from None
        self._l2_cache: OrderedDict[int, tables.L2Runs] = OrderedDict()
        self._l2_lock = _thread.allocate_lock()  # threading's Lock, without its import
        self._l2_cache_max = max(4, L2_CACHE_BYTES // (self.cluster_size + L2_RUNS_OVERHEAD))
        self._l2_plain: dict[int, PlainL2Runs] = {}
        self._plain_budget = PLAIN_L2_BYTES
        self._compressed_cache: tuple[int, bytes] | None = None
        self._metadata_prealloc: bool | None = None
        self._snapshots: list[Snapshot] | None = None
        self._bitmaps: list[BitmapEntry] | None = None

    @property
    def l2_offsets(self) -> tables.U64:
        """L2 table offsets from the L1 table (0: no table), decoded on first use."""
        if self._l2_offsets is None:
            try:
                self._l2_offsets = _l1_to_offsets(self._raw_l1, self.cluster_size)
            except QcowlibError as exc:
                raise exc.with_file(self.filename) from None
            self._raw_l1 = b""
        return self._l2_offsets

    @l2_offsets.setter
    def l2_offsets(self, value: tables.U64) -> None:
        self._l2_offsets = value

    # -- links and info -------------------------------------------------------------------
    @property
    def backing_file_name(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_file_format(self) -> str | None:
        return self.header.backing_format

    @property
    def data_file_name(self) -> str | None:
        return self.header.data_file if self.header.has_data_file else None

    def attach_data_file(self, host: HostFile, path: str) -> None:
        self.data_host = host
        self.data_filename = path

    def info_head(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        snaps = self.snapshots()
        if snaps:
            info["snapshots"] = [
                {
                    **({"icount": s.icount} if s.icount is not None else {}),
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    "name": s.name,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
                    "id": s.id_str,
                    "vm-state-size": s.vm_state_size,
                }
                for s in snaps
            ]
        h = self.header
        if h.backing_format is not None and h.backing_file is not None:
            info["backing-filename-format"] = h.backing_format
        return info

    @property
    def info_cluster_size(self) -> int | None:
        return self.cluster_size

    def info_tail(self) -> dict[str, Any]:
        h = self.header
        data: dict[str, Any] = {"compat": h.compat, "compression-type": h.compression_type_name}
        if h.version >= 3:
            data["lazy-refcounts"] = h.lazy_refcounts
            bitmaps = self.bitmaps()
            if bitmaps:
                data["bitmaps"] = [
                    {"flags": b.flag_names, "name": b.shown_name, "granularity": b.granularity}
                    for b in bitmaps
                ]
        data["refcount-bits"] = h.refcount_bits
        if self.luks is not None:
            from qcowlib.formats.luks.codec import info as luks_info

            data["encrypt"] = luks_info(self.luks, embedded=True)
        if h.has_data_file:
            data["data-file"] = h.data_file
            data["data-file-raw"] = h.data_file_raw
        if h.version >= 3:
            data["corrupt"] = h.corrupt
            data["extended-l2"] = h.extended_l2
        info: dict[str, Any] = {"format-specific": {"type": "qcow2", "data": data}}
        if h.backing_file is not None:
            info["full-backing-filename"] = full_backing_filename(self.filename, h.backing_file)
            info["backing-filename"] = h.backing_file
        if self.encrypted:
            info["encrypted"] = True
        info["dirty-flag"] = h.dirty
        return qdict_order(info)

    @property
    def supports_persistent_bitmaps(self) -> bool:
        return self.header.version >= 3

    def persistent_bitmaps(self) -> list[BitmapEntry]:
        return self.bitmaps()

    def actual_size(self) -> int | None:
        # qemu-img 7.2 counts the image file only, not an external data file.
        return self.host.allocated

    def _split_holes(self, ext: Extent) -> Iterator[Extent]:
        """Mark the parts of a DATA extent that are holes in (or past the end of) the file."""
        assert ext.host_offset is not None
        host = ext.host_offset
        for s, e, is_data in self.data_host.segments(host, host + ext.length):
            part = ext.clip(ext.start + (s - host), ext.start + (e - host))
            yield part if is_data else part.as_hole()

    # -- mapping ------------------------------------------------------------------------
    def _l2_runs(self, l1_index: int) -> tables.L2Runs | None:
        """Decoded runs of the L2 table behind L1 entry ``l1_index`` (None: no table).

        Safe to call from several threads (readers in a worker pool share the cache).
        """
        with self._l2_lock:
            return self._l2_runs_locked(l1_index)

    def _l2_runs_ahead(self, l1_index: int, last_index: int) -> tables.L2Runs | None:
        """:meth:`_l2_runs`, decoding on a miss the tables up to ``last_index`` too.

        A range over many tables (a map, a convert of small clusters) then pays the numpy
        work once per batch instead of once per table.
        """
        with self._l2_lock:
            if l1_index not in self._l2_cache and last_index > l1_index and not self.extended_l2:
                self._load_l2_batch(l1_index, last_index)
            return self._l2_runs_locked(l1_index)

    def _load_l2_batch(self, first: int, last: int) -> None:
        import numpy as np

        from qcowlib.formats.qcow2 import tables

        cs = self.cluster_size
        last = self._batch_last(first, last, self.l2_offsets.size)
        offsets = self.l2_offsets[first : last + 1]
        # Offsets that are bad are left to the one-table path, which names the problem.
        usable = (offsets >= np.uint64(cs)) & (offsets + np.uint64(cs) <= np.uint64(self.host.size))
        want = [
            first + i for i in np.flatnonzero(usable).tolist() if first + i not in self._l2_cache
        ]
        if len(want) < 2:
            return
        buf = bytearray(len(want) * cs)
        view = memoryview(buf)
        for k, l1_index in enumerate(want):
            self.host.pread_into(int(self.l2_offsets[l1_index]), view[k * cs : (k + 1) * cs])
        entries = tables.decode_table(buf).reshape(len(want), -1)
        try:
            decoded = tables.decode_l2_tables(
                entries,
                cluster_bits=self.cluster_bits,
                has_data_file=self.header.has_data_file,
                tables=[f"L2 table {i}" for i in want],
            )
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
        for l1_index, runs in zip(want, decoded, strict=True):
            self._l2_cache[l1_index] = runs
        while len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)

    def _l2_runs_locked(self, l1_index: int) -> tables.L2Runs | None:
        from qcowlib.formats.qcow2 import tables

        cached = self._l2_cache.get(l1_index)
        if cached is not None:
            self._l2_cache.move_to_end(l1_index)
            return cached
        offset = int(self.l2_offsets[l1_index])
        if offset == 0:
            return None
        what = f"L2 table {l1_index}"
        self._check_l2_offset(l1_index, offset)
        raw = tables.decode_table(self.host.pread(offset, self.cluster_size))
        try:
            if self.extended_l2:
                runs = tables.decode_l2(
                    raw[0::2],
                    cluster_bits=self.cluster_bits,
                    bitmaps=raw[1::2],
                    has_data_file=self.header.has_data_file,
                    table=what,
                )
            else:
                runs = tables.decode_l2(
                    raw,
                    cluster_bits=self.cluster_bits,
                    has_data_file=self.header.has_data_file,
                    table=what,
                )
        except QcowlibError as exc:
            raise exc.with_file(self.filename) from None
        self._l2_cache[l1_index] = runs
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)
        return runs

    def _has_l2(self, l1_index: int) -> bool:
        """Whether L1 entry ``l1_index`` points at an L2 table; an L1 not decoded yet (a
        small one) is read without numpy, so mapping an empty image stays light."""
        if self._l2_offsets is None:
            return bool(self._raw_l2_offset(l1_index))
        return l1_index < self._l2_offsets.size and bool(self._l2_offsets[l1_index])

    def _need_key(self) -> None:
        if self.encrypted and self._cipher is None:
            raise InvalidArgument(
                "Parameter 'encrypt.key-secret' is required for cipher (give it with "
                "--object secret,id=ID,data=... --image-opts "
                "driver=qcow2,file.filename=FILE,encrypt.key-secret=ID)",
                file=self.filename,
            )

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        self._need_key()
        start, end = self._range(offset, length)
        plain = self._plain_ok(start, end)  # a small range while numpy is not loaded
        pos = start
        unit = self.unit_size
        last_index = (end - 1) // self.l2_span
        while pos < end:
            l1_index = pos // self.l2_span
            table_base = l1_index * self.l2_span
            table_end = min(end, table_base + self.l2_span)
            runs: tables.L2Runs | PlainL2Runs | None = None
            if self._has_l2(l1_index):
                ahead = self._plain_runs_ahead if plain else self._l2_runs_ahead
                runs = ahead(l1_index, last_index)
            if runs is None:
                yield Extent(pos, table_end - pos, ExtentKind.UNALLOCATED)
                pos = table_end
                continue
            first_unit = (pos - table_base) // unit
            if plain:
                i = bisect_right(runs.start, first_unit) - 1
            else:
                import numpy as np  # loaded already: decoding the table needed it

                i = int(np.searchsorted(runs.start, first_unit, side="right")) - 1
            yield from self._table_extents(runs, i, pos, table_base, table_end)
            pos = table_end

    def _table_extents(
        self,
        runs: tables.L2Runs | PlainL2Runs,
        i: int,
        pos: int,
        table_base: int,
        table_end: int,
    ) -> Iterator[Extent]:
        """The extents of ``[pos, table_end)`` in one table's runs, from run ``i`` on."""
        unit = self.unit_size
        n_runs = len(runs.start)
        while pos < table_end:
            run_start = int(runs.start[i])
            run_units = int(runs.count[i])
            g_start = table_base + run_start * unit
            g_end = min(table_end, table_base + (run_start + run_units) * unit)
            kind = RUN_KINDS[int(runs.kind[i])]
            host = int(runs.host[i])
            if kind is ExtentKind.COMPRESSED:
                ext = Extent(
                    g_start,
                    g_end - g_start,
                    kind,
                    host_offset=host,
                    file=self.filename,
                    compressed_length=int(runs.clen[i]),
                )
            elif kind is ExtentKind.DATA or host:
                ext = Extent(
                    g_start, g_end - g_start, kind, host_offset=host, file=self.data_filename
                )
            else:
                ext = Extent(g_start, g_end - g_start, kind)
            ext = ext.clip(pos, table_end)
            if kind is ExtentKind.DATA and self.metadata_preallocated():
                yield from self._split_holes(ext)
            else:
                yield ext
            pos = g_end
            i += 1
            if i >= n_runs:
                break

    def layer_runs(self, offset: int, end: int) -> Runs:
        """:meth:`layer_extents` as arrays, built a decoded L2 table at a time."""
        self._need_key()

        self._range(offset, end - offset)
        if self.metadata_preallocated():
            return super().layer_runs(offset, end)  # data may be holes: ask the file
        parts, unordered = self._table_runs(offset, end)
        return self._clipped_runs(parts, unordered, offset, end)

    def _table_runs(self, offset: int, end: int) -> tuple[list[tuple[np.ndarray, ...]], bool]:
        """(start, length, kind, host, clen) arrays of every L2 table that ``[offset,
        end)`` touches, absent tables as one unallocated run each (appended last: the
        second value says whether there are any, so that the runs need sorting)."""
        import numpy as np

        span, unit = self.l2_span, self.unit_size
        parts: list[tuple[np.ndarray, ...]] = []
        first, last = offset // span, max(offset, end - 1) // span
        present = self.l2_offsets[first : last + 1] != 0
        absent = np.flatnonzero(~present) + first
        if last >= self.l2_offsets.size:  # tables past the L1 table's end
            absent = np.concatenate((absent, np.arange(max(first, self.l2_offsets.size), last + 1)))
        for l1_index in (np.flatnonzero(present) + first).tolist():
            runs = self._l2_runs_ahead(l1_index, last)
            base = l1_index * span
            if runs is None:  # pragma: no cover - present tables decode to runs
                absent = np.append(absent, l1_index)
                continue
            parts.append(
                (runs.start * unit + base, runs.count * unit, runs.kind, runs.host, runs.clen)
            )
        if absent.size:
            starts = absent.astype(np.int64) * span
            zeros = np.zeros(starts.size, dtype=np.int64)
            parts.append((starts, zeros + span, zeros.astype(np.uint8), zeros, zeros))
        return parts, bool(absent.size)

    def _clipped_runs(
        self, parts: list[tuple[np.ndarray, ...]], unordered: bool, offset: int, end: int
    ) -> Runs:
        """The tables' runs in order, clipped to ``[offset, end)``, as :class:`Runs`."""
        import numpy as np

        start = np.concatenate([p[0] for p in parts])
        length = np.concatenate([p[1] for p in parts])
        kind = np.concatenate([p[2] for p in parts]).astype(np.uint8)
        host = np.concatenate([p[3] for p in parts]).astype(np.int64)
        clen = np.concatenate([p[4] for p in parts]).astype(np.int64)
        # In order (tables absent from L1 come last), clipped to [offset, end): runs
        # never cross a table, so only the ends need it.
        order = np.argsort(start, kind="stable") if unordered else np.arange(start.size)
        keep = order[np.minimum(start + length, end)[order] > np.maximum(start, offset)[order]]
        start, length, kind, host, clen = (
            start[keep],
            length[keep],
            kind[keep],
            host[keep],
            clen[keep],
        )
        stop = np.minimum(start + length, end)
        clipped = np.maximum(start, offset)
        shift = clipped - start
        compressed = kind == RUN_COMPRESSED
        # A compressed cluster always has a host offset, 0 included (hostile images):
        # reading it then fails like any other bad compressed cluster.
        has_host = (kind == RUN_DATA) | compressed | (host != 0)
        host = np.where(has_host, host + np.where(compressed, 0, shift), -1)
        # Files as layer_extents names them: data runs and runs with a host offset
        # live in the data file, compressed ones in the image, the rest nowhere.
        file = np.where(compressed, 1, np.where(has_host, 2, 0)).astype(np.int64)
        n = clipped.size
        return Runs(
            clipped,
            stop - clipped,
            kind,
            host,
            np.where(compressed, clen, 0),
            np.zeros(n, dtype=np.bool_),
            np.zeros(n, dtype=np.int64),
            file,
            (None, self.filename, self.data_filename),
        )

    @property
    def run_granule(self) -> int:
        """A (sub)cluster: runs follow the L2 entries, unless holes of the file cut
        them (an external data file; metadata preallocation, where :meth:`layer_runs`
        asks the file)."""
        if self.data_host is not self.host or self.metadata_preallocated():
            return super().run_granule
        return self.unit_size

    def runs_data_file(self) -> HostFile | None:
        return None if self.encrypted else self.data_host

    # -- reading ------------------------------------------------------------------------
    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        assert ext.host_offset is not None
        if self._cipher is not None and ext.kind is ExtentKind.DATA:
            buf[:] = self._cipher.read(self.data_host, ext.host_offset, len(buf))
            return
        if ext.kind is ExtentKind.DATA:
            self.data_host.pread_into(ext.host_offset, buf)
            return
        data = self._decompressed(ext)
        within = ext.start % self.cluster_size
        buf[:] = data[within : within + len(buf)]

    def _decompressed(self, ext: Extent) -> bytes:
        from qcowlib.formats.qcow2.compress import decompress_cluster

        host = ext.host_offset
        assert host is not None
        cached = self._compressed_cache
        if cached is not None and cached[0] == host:
            return cached[1]
        if host >= self.host.size:
            raise TruncatedImage(
                "compressed cluster is past the end of the file",
                file=self.filename,
                structure="compressed cluster",
                offset=host,
            )
        length = min(ext.compressed_length, self.host.size - host)
        raw = self.host.pread(host, length)
        try:
            data = decompress_cluster(raw, self.header.compression_type, self.cluster_size)
        except QcowlibError as exc:
            exc.offset = host
            exc.structure = "compressed cluster"
            raise exc.with_file(self.filename) from None
        self._compressed_cache = (host, data)
        return data

    def host_file_for(self, ext: Extent) -> HostFile | None:
        return self.data_host if ext.kind is ExtentKind.DATA and not self.encrypted else None

    def _close_layer(self) -> None:
        self.host.close()
        if self.data_host is not self.host:
            self.data_host.close()


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> Qcow2Disk:
    """The registry's opener: one qcow2 layer (backing and data files are the chain's)."""
    return Qcow2Disk(host, path, read_header(host))
