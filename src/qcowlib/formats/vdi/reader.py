"""VirtualBox VDI images (static and dynamic), read-only.

The header and block map are read and validated once on open
(:mod:`qcowlib.formats.vdi.codec`), and the whole block map is turned into runs with numpy:
consecutive blocks that are both zero (VDI_UNALLOCATED or VDI_DISCARDED, which read as
zeros since a VDI has no backing file here) or both data at consecutive block indexes
form one run.  Mapping and reads then walk runs, never single blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import RUN_DATA, RUN_ZERO, Disk, Extent, ExtentKind, Runs
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError, TruncatedImage
from qcowlib.formats.vdi import codec as vdi

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

I64 = npt.NDArray[np.int64]


def read_header(host: HostFile) -> vdi.VdiHeader:
    """Read and parse the header sector of a VDI file (see :func:`vdi.parse_header`)."""
    if host.size < vdi.HEADER_AREA_SIZE:
        raise TruncatedImage("VDI header is truncated", file=host.path, structure="header")
    try:
        return vdi.parse_header(host.pread(0, vdi.HEADER_AREA_SIZE), host.size)
    except QcowlibError as exc:
        raise exc.with_file(host.path) from None


class VdiDisk(Disk):
    """A VDI image opened read-only.

    Raises :class:`qcowlib.errors.FormatError` subclasses for a bad header or block map
    and :class:`qcowlib.errors.UnsupportedFeature` for differencing, undo and linked
    images (see :func:`qcowlib.formats.vdi.codec.parse_header`).
    """

    format = "vdi"

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename
        self.header = header = read_header(host)
        self.virtual_size = header.virtual_size
        self.block_size = header.block_size
        offset, length = vdi.block_map_extent(header)
        raw = host.pread_exact(offset, length, "block map") if length else b""
        try:
            self.bmap = vdi.decode_block_map(raw, header, host.size)
        except QcowlibError as exc:
            raise exc.with_file(filename) from None
        self._runs_start, self._runs_count, self._runs_host = _block_runs(
            self.bmap, header.offset_data, header.block_size
        )
        # Only a sparse host file can have holes under allocated blocks (a static image
        # is created by truncation): skip the hole probing otherwise.
        self._maybe_holes = host.allocated < host.size

    @property
    def blocks_allocated(self) -> int:
        """Blocks with data in the file (what the header's ``blocks_allocated`` counts)."""
        return int(np.count_nonzero(self.bmap < np.uint32(vdi.VDI_DISCARDED)))

    # -- mapping ------------------------------------------------------------------------
    def _runs(self, start: int, end: int) -> Iterator[Extent]:
        """ZERO and DATA runs over ``[start, end)`` from the block map alone."""
        bs = self.block_size
        starts = self._runs_start
        i = int(np.searchsorted(starts, start // bs, side="right")) - 1
        pos = start
        while pos < end:
            r_start = int(starts[i]) * bs
            r_end = min(end, (int(starts[i]) + int(self._runs_count[i])) * bs)
            host = int(self._runs_host[i])
            if host < 0:
                yield Extent(pos, r_end - pos, ExtentKind.ZERO)
            else:
                yield Extent(
                    pos,
                    r_end - pos,
                    ExtentKind.DATA,
                    host_offset=host + (pos - r_start),
                    file=self.filename,
                )
            pos = r_end
            i += 1

    @property
    def info_cluster_size(self) -> int | None:
        return self.block_size

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        for ext in self._runs(start, end):
            if ext.kind is ExtentKind.DATA and self._maybe_holes:
                # qemu-img map looks into the file under VDI data blocks: holes there
                # (a static image's untouched blocks) are "data" and "zero".
                yield from self._split_holes(ext)
            else:
                yield ext

    def _split_holes(self, ext: Extent) -> Iterator[Extent]:
        assert ext.host_offset is not None
        host = ext.host_offset
        for s, e, is_data in self.host.segments(host, host + ext.length):
            part = ext.clip(ext.start + (s - host), ext.start + (e - host))
            yield part if is_data else part.as_hole()

    def layer_runs(self, offset: int, end: int) -> Runs:
        """:meth:`layer_extents` as arrays: the block runs over ``[offset, end)``, data
        runs cut at holes in the file when it may have some."""
        from qcowlib.core.layerruns import layer_runs, split_by_holes

        start, end = self._range(offset, end - offset)
        bs = self.block_size
        a = int(np.searchsorted(self._runs_start, start // bs, side="right")) - 1
        b = int(np.searchsorted(self._runs_start, -(-end // bs), side="left"))
        first = self._runs_start[a:b] * bs
        r_start = np.maximum(first, start)
        r_end = np.minimum(first + self._runs_count[a:b] * bs, end)
        r_host = self._runs_host[a:b]
        keep = r_end > r_start
        r_start, r_len = r_start[keep], (r_end - r_start)[keep]
        data = r_host[keep] >= 0
        host = np.where(data, r_host[keep] + (r_start - first[keep]), -1)
        hole = np.zeros(r_start.size, dtype=np.bool_)
        if self._maybe_holes and data.any():
            run, p_start, p_len, p_host, p_data = split_by_holes(
                self.host, r_start[data], r_len[data], host[data]
            )
            rows = np.flatnonzero(data)[run]
            zero = np.flatnonzero(~data)
            r_start = np.concatenate((r_start[zero], p_start))
            order = np.argsort(r_start, kind="stable")
            r_start = r_start[order]
            r_len = np.concatenate((r_len[zero], p_len))[order]
            host = np.concatenate((host[zero], p_host))[order]
            hole = np.concatenate((np.zeros(zero.size, np.bool_), ~p_data))[order]
            data = np.concatenate((data[zero], data[rows]))[order]
        kind = np.where(data, RUN_DATA, RUN_ZERO).astype(np.uint8)
        return layer_runs(
            r_start, r_len, kind, host, data.astype(np.int64), (None, self.filename), hole
        )

    def runs_data_file(self) -> HostFile | None:
        return self.host

    # -- reads --------------------------------------------------------------------------
    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        # No backing file and no hole probing needed: one pread per data run.
        view = memoryview(buf).cast("B")
        start, end = self._range(offset, len(view))
        for ext in self._runs(start, end):
            part = view[ext.start - start : ext.end - start]
            if ext.kind is ExtentKind.DATA:
                self._read_layer(ext, part)
            else:
                part[:] = bytes(len(part)) if len(part) < 65536 else bytearray(len(part))

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        assert ext.host_offset is not None
        self.host.pread_into(ext.host_offset, buf)

    def host_file_for(self, ext: Extent) -> HostFile | None:
        return self.host

    def _close_layer(self) -> None:
        self.host.close()


def _block_runs(bmap: vdi.U32, offset_data: int, block_size: int) -> tuple[I64, I64, I64]:
    """Runs of the block map: first block, block count, host offset (-1: zeros).

    A run is a maximal range of blocks that all read as zeros, or that are all
    allocated at consecutive block indexes (so one host range).  Always at least one
    run, so lookups never fall off the start.
    """
    n = bmap.size
    if n == 0:
        empty = np.zeros(1, dtype=np.int64)
        return empty, empty.copy(), np.full(1, -1, dtype=np.int64)
    entries = bmap.astype(np.int64)
    allocated = bmap < np.uint32(vdi.VDI_DISCARDED)
    # Block i starts a new run when its kind differs from block i-1, or when both are
    # data but not at consecutive indexes.
    breaks = np.empty(n, dtype=np.bool_)
    breaks[0] = True
    breaks[1:] = (allocated[1:] != allocated[:-1]) | (
        allocated[1:] & (entries[1:] != entries[:-1] + 1)
    )
    first = np.flatnonzero(breaks).astype(np.int64)
    count = np.diff(np.append(first, n)).astype(np.int64)
    host = np.where(allocated[first], offset_data + entries[first] * block_size, -1)
    return first, count, host.astype(np.int64)


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> VdiDisk:
    """The registry's opener."""
    return VdiDisk(host, path)
