"""VHDX images, dynamic and fixed, opened read-only.

What is read and refused follows QEMU's ``vhdx_open`` (see :mod:`qcowlib.formats.vhdx.codec`),
with these deliberate differences:

* an image whose current header names a log (non-zero log GUID) is refused with
  :class:`UnsupportedFeature`: the log holds metadata or data writes that must be
  replayed first, and reading without replaying them could return stale content (QEMU
  replays the log when it may write, and refuses otherwise);
* differencing images (``has_parent``) are refused with :class:`UnsupportedFeature`;
* a payload block in state ``PARTIALLY_PRESENT`` or an unknown state is refused as
  corrupt when the image is opened rather than when it is read.

Payload blocks map to extents by state: ``FULLY_PRESENT`` is data (holes in the file
read as zeros), ``ZERO`` reads zeros, ``NOT_PRESENT``, ``UNDEFINED`` and ``UNMAPPED``
are unallocated and read zeros (there is no parent).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import Disk, Extent, ExtentKind
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import QcowlibError, UnsupportedFeature
from qcowlib.formats.vhdx import codec as vhdx

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

#: Cap on the metadata items read (the known ones are at most 16 bytes).
_MAX_ITEM = 4096
_KIND_UNALLOCATED = 0
_KIND_ZERO = 1
_KIND_DATA = 2


class VhdxDisk(Disk):
    """A dynamic or fixed VHDX image.

    Raises :class:`QcowlibError` subclasses naming the structure, field and offset at
    fault when the image cannot be read; :class:`UnsupportedFeature` for a log that must
    be replayed, differencing images, unknown required regions or metadata items.
    """

    format = "vhdx"
    #: Opened for ``check``: the BAT is decoded but not judged, and nothing is mapped.
    checking = False

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename
        try:
            self._open()
        except QcowlibError as exc:
            raise exc.with_file(filename) from None

    def _open(self) -> None:
        size = self.host.size
        area = self.host.pread(0, min(size, vhdx.VHDX_HEADER_AREA))
        self.creator = vhdx.parse_file_identifier(area)
        self.header, self.header_offset = vhdx.current_header(area)
        if self.header.log_needs_replay:
            raise UnsupportedFeature(
                "VHDX image has a log that must be replayed (open it once read-write "
                "with qemu-img check -r all, or with Hyper-V)",
                structure="vhdx header",
                field="log_guid",
                offset=self.header_offset + 48,
            )
        self.regions = self._region_table(area)
        self.bat_region, self.meta_region = vhdx.check_regions(
            self.regions, size, vhdx.VHDX_REGION_TABLE_OFFSETS[0]
        )
        self.metadata = self._metadata(self.meta_region)
        m = self.metadata
        if m.has_parent:
            raise UnsupportedFeature(
                "differencing VHDX images are not supported",
                structure="vhdx metadata",
                field="has_parent",
            )
        self.virtual_size = m.virtual_disk_size
        self.block_size = m.block_size
        entries = vhdx.bat_size(m, self.bat_region)
        # The region lies inside the file (check_regions), so this allocation is bounded
        # by the file size.
        at = self.bat_region.file_offset
        self.bat = vhdx.decode_bat(self.host.pread_exact(at, entries * 8, "vhdx bat"), entries, at)
        if self.checking:
            return  # qemu-img check counts what check_bat refuses (formats/vhdx/check.py)
        self.payload = vhdx.check_bat(self.bat, m, size, at)
        states = vhdx.bat_states(self.payload)
        kinds = np.full(states.shape, _KIND_UNALLOCATED, dtype=np.int8)
        kinds[states == vhdx.PAYLOAD_BLOCK_ZERO] = _KIND_ZERO
        kinds[states == vhdx.PAYLOAD_BLOCK_FULLY_PRESENT] = _KIND_DATA
        self._kinds: npt.NDArray[np.int8] = kinds
        self._hosts: npt.NDArray[np.int64] = vhdx.bat_offsets(self.payload).astype(np.int64)

    def _region_table(self, area: bytes) -> tuple[vhdx.RegionEntry, ...]:
        first: QcowlibError | None = None
        for at in vhdx.VHDX_REGION_TABLE_OFFSETS:
            try:
                return vhdx.parse_region_table(area[at : at + vhdx.VHDX_REGION_TABLE_SIZE], at)
            except QcowlibError as exc:
                first = first or exc
        assert first is not None
        raise first

    def _metadata(self, region: vhdx.RegionEntry) -> vhdx.Metadata:
        base = region.file_offset
        table = self.host.pread_exact(base, vhdx.VHDX_METADATA_TABLE_SIZE, "vhdx metadata table")
        entries = vhdx.parse_metadata_table(table, region.length, base)
        items = {
            e.item_id: self.host.pread(base + e.offset, min(e.length, _MAX_ITEM))
            for e in entries
            if e.item_id in vhdx.VHDX_KNOWN_METADATA and e.item_id != vhdx.VHDX_PARENT_LOCATOR
        }
        return vhdx.decode_metadata(entries, items, base)

    @property
    def subformat(self) -> str:
        """``"fixed"`` when the image keeps its blocks allocated, else ``"dynamic"``."""
        return "fixed" if self.metadata.leave_blocks_allocated else "dynamic"

    @property
    def cluster_size(self) -> int:
        """The block size (what ``qemu-img info`` shows as cluster_size)."""
        return self.block_size

    @property
    def info_cluster_size(self) -> int | None:
        return self.cluster_size

    # -- mapping ------------------------------------------------------------------------
    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        if start == end:
            return
        bs = self.block_size
        first = start // bs
        last = (end - 1) // bs
        kinds = self._kinds[first : last + 1]
        hosts = self._hosts[first : last + 1]
        # A run breaks where the kind changes, or data is not contiguous in the file.
        brk = kinds[1:] != kinds[:-1]
        brk |= (kinds[1:] == _KIND_DATA) & (hosts[1:] != hosts[:-1] + bs)
        starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
        stops = np.concatenate((starts[1:], [kinds.size]))
        for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
            g_start = max(start, (first + s) * bs)
            g_end = min(end, (first + e) * bs)
            kind = int(kinds[s])
            if kind == _KIND_DATA:
                delta = int(hosts[s]) - (first + s) * bs
                yield from self._data_extents(g_start, g_end, delta)
            elif kind == _KIND_ZERO:
                yield Extent(g_start, g_end - g_start, ExtentKind.ZERO)
            else:
                yield Extent(g_start, g_end - g_start, ExtentKind.UNALLOCATED)

    def _data_extents(self, start: int, end: int, delta: int) -> Iterator[Extent]:
        """Present guest bytes ``[start, end)`` at file offset + ``delta``; holes read 0."""
        for s, e, is_data in self.host.segments(start + delta, end + delta):
            kind = ExtentKind.DATA if is_data else ExtentKind.ZERO
            yield Extent(s - delta, e - s, kind, host_offset=s, file=self.filename)

    # -- reading ------------------------------------------------------------------------
    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        assert ext.host_offset is not None
        self.host.pread_into(ext.host_offset, buf)

    def host_file_for(self, ext: Extent) -> HostFile | None:
        return self.host

    def _close_layer(self) -> None:
        self.host.close()


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> VhdxDisk:
    """The registry's opener."""
    return VhdxDisk(host, path)
