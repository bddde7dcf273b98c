"""VHDX images, dynamic and fixed, opened read-only.

What is read and refused follows QEMU's ``vhdx_open`` (see :mod:`qcowlib.formats.vhdx.codec`).
An image whose log holds entries to replay is refused with :class:`UnsupportedFeature`,
as QEMU refuses it read-only (``qcowlib check -r all`` replays it, see
:mod:`qcowlib.formats.vhdx.replay`); a log GUID without a valid entry is ignored, as QEMU
ignores it.  Deliberate differences:

* differencing images (``has_parent``, what Hyper-V writes for checkpoints, ``.avhdx``)
  are read over their parent, named by the parent locator (``relative_path`` first) and
  checked by ``parent_linkage``; QEMU refuses them;
* in a disk without parent, a payload block in state ``PARTIALLY_PRESENT`` or an unknown
  state is refused as corrupt when the image is opened rather than when it is read.

Payload blocks map to extents by state: ``FULLY_PRESENT`` is data (holes in the file
read as zeros), ``ZERO`` reads zeros, ``NOT_PRESENT``, ``UNDEFINED`` and ``UNMAPPED``
are unallocated: zeros without a parent, the parent's data in a differencing disk, where
``PARTIALLY_PRESENT`` blocks take each sector from here or from the parent as the
chunk's sector bitmap says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import (
    RUN_DATA,
    RUN_UNALLOCATED,
    RUN_ZERO,
    Disk,
    Extent,
    ExtentKind,
    Runs,
    full_backing_filename,
)
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import BackingMismatch, CorruptImage, QcowlibError
from qcowlib.formats.vhdx import codec as vhdx
from qcowlib.formats.vhdx.replay import refuse_unreplayed

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

#: Cap on the metadata items read (the known ones are at most 16 bytes).
_MAX_ITEM = 4096
_KIND_UNALLOCATED = 0
_KIND_ZERO = 1
_KIND_DATA = 2
_KIND_PARTIAL = 3
#: Sector bitmap bytes read at once by :meth:`VhdxDisk.layer_runs` at most.
_MAX_BITMAP_READ = 8 << 20
#: A parent locator item longer than this is not one (a few paths of 32K characters).
_MAX_LOCATOR = 1 << 18


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
        # QEMU's vhdx_parse_log: a log with an active sequence must be replayed first.
        refuse_unreplayed(self.host, self.header, self.header_offset, self.filename)
        self.regions = self._region_table(area)
        log = (self.header.log_offset, self.header.log_length)
        self.bat_region, self.meta_region = vhdx.check_regions(
            self.regions, size, vhdx.VHDX_REGION_TABLE_OFFSETS[0], log
        )
        self.metadata = self._metadata(self.meta_region)
        m = self.metadata
        self.parent_name: str | None = None
        self.parent_linkage: str | None = None
        if m.has_parent:
            self.parent_name, self.parent_linkage = self._parent_locator(self.meta_region)
        self.virtual_size = m.virtual_disk_size
        self.block_size = m.block_size
        entries = vhdx.bat_entries(
            m.virtual_disk_size, m.block_size, m.chunk_ratio, has_parent=m.has_parent
        )
        if entries * 8 > self.bat_region.length:
            entries = vhdx.bat_size(m, self.bat_region)  # raises: the region is too small
        # The region lies inside the file (check_regions), so this allocation is bounded
        # by the file size.
        at = self.bat_region.file_offset
        self.bat = vhdx.decode_bat(self.host.pread_exact(at, entries * 8, "vhdx bat"), entries, at)
        if self.checking:
            return  # qemu-img check counts what check_bat refuses (formats/vhdx/check.py)
        self._bits_at = np.zeros(0, dtype=np.int64)
        if m.has_parent:
            self.payload, self._bits_at = vhdx.check_differencing_bat(self.bat, m, size, at)
        else:
            self.payload = vhdx.check_bat(self.bat, m, size, at, self.occupied)
        states = vhdx.bat_states(self.payload)
        kinds = np.full(states.shape, _KIND_UNALLOCATED, dtype=np.int8)
        kinds[states == vhdx.PAYLOAD_BLOCK_ZERO] = _KIND_ZERO
        kinds[states == vhdx.PAYLOAD_BLOCK_FULLY_PRESENT] = _KIND_DATA
        kinds[states == vhdx.PAYLOAD_BLOCK_PARTIALLY_PRESENT] = _KIND_PARTIAL
        self._kinds: npt.NDArray[np.int8] = kinds
        self._hosts: npt.NDArray[np.int64] = vhdx.bat_offsets(self.payload).astype(np.int64)

    @property
    def occupied(self) -> list[tuple[int, int]]:
        """``(start, end)`` of the log and of every region table entry: no payload
        block may meet them (QEMU's ``vhdx_region_check``)."""
        h = self.header
        return [
            (h.log_offset, h.log_offset + h.log_length),
            *((r.file_offset, r.file_offset + r.length) for r in self.regions),
        ]

    def _region_table(self, area: bytes) -> tuple[vhdx.RegionEntry, ...]:
        first: QcowlibError | None = None
        for at in vhdx.VHDX_REGION_TABLE_OFFSETS:
            try:
                return vhdx.parse_region_table(area[at : at + vhdx.VHDX_REGION_TABLE_SIZE], at)
            except QcowlibError as exc:
                first = first or exc
        assert first is not None
        raise first

    def _parent_locator(self, region: vhdx.RegionEntry) -> tuple[str, str | None]:
        """The parent's file name and linkage GUID from the parent locator item (spec
        2.6.2.6): ``relative_path`` first, else the last component of an absolute one."""
        base = region.file_offset
        table = self.host.pread_exact(base, vhdx.VHDX_METADATA_TABLE_SIZE, "vhdx metadata table")
        entries = vhdx.parse_metadata_table(table, region.length, base)
        item = next((e for e in entries if e.item_id == vhdx.VHDX_PARENT_LOCATOR), None)
        pairs: dict[str, str] = {}
        if item is not None:
            pairs = vhdx.parse_parent_locator(
                self.host.pread(base + item.offset, min(item.length, _MAX_LOCATOR))
            )
        name = pairs.get("relative_path", "").replace("\\", "/").removeprefix("./")
        for key in ("absolute_win32_path", "volume_path"):
            if not name and pairs.get(key):
                name = pairs[key].replace("\\", "/").rsplit("/", 1)[-1]
        if not name:
            raise CorruptImage(
                "differencing VHDX names no parent (no usable parent locator)",
                structure="vhdx metadata",
                field="parent_locator",
            )
        linkage = pairs.get("parent_linkage")
        return name, linkage.strip("{}").upper() if linkage else None

    @property
    def backing_file_name(self) -> str | None:
        return self.parent_name

    @property
    def backing_file_format(self) -> str | None:
        return "vhdx" if self.parent_name is not None else None

    def check_parent(self, parent: Disk) -> None:
        """A differencing disk reads only over the parent it was made from: the parent's
        ``DataWriteGuid`` must be the recorded ``parent_linkage`` (as Hyper-V checks)."""
        if self.parent_linkage is None:
            return
        have = (
            vhdx.guid_text(parent.header.data_write_guid) if isinstance(parent, VhdxDisk) else None
        )
        if have != self.parent_linkage:
            raise BackingMismatch(
                f"parent {parent.filename!r} is not the VHDX this differencing disk was made "
                "over (its data write GUID differs from parent_linkage): the chain would read "
                "wrong data",
                file=self.filename,
                structure="vhdx metadata",
                field="parent_linkage",
            )

    def info_head(self) -> dict[str, Any]:
        return {"backing-filename-format": "vhdx"} if self.parent_name is not None else {}

    def info_tail(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.parent_name is not None:
            info["full-backing-filename"] = full_backing_filename(self.filename, self.parent_name)
            info["backing-filename"] = self.parent_name
        info["dirty-flag"] = False
        return info

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
            elif kind == _KIND_PARTIAL:
                for block in range(first + s, first + e):
                    b_start = block * bs
                    lo, hi = max(g_start, b_start), min(g_end, b_start + bs)
                    yield from self._partial_extents(block, lo, hi)
            elif kind == _KIND_ZERO:
                yield Extent(g_start, g_end - g_start, ExtentKind.ZERO)
            else:
                yield Extent(g_start, g_end - g_start, ExtentKind.UNALLOCATED)

    def _partial_extents(self, block: int, start: int, end: int) -> Iterator[Extent]:
        """A partially present block: sectors whose bit is set in the chunk's sector
        bitmap (least significant bit first) are here, the others are the parent's."""
        lss = self.metadata.logical_sector_size
        b_start = block * self.block_size
        raw = self.host.pread_exact(
            int(self._bits_at[block]), self.block_size // lss // 8, "vhdx sector bitmap"
        )
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        edges = np.flatnonzero(np.diff(bits.astype(np.int8))) + 1
        starts = np.concatenate(([0], edges))
        stops = np.concatenate((edges, [bits.size]))
        host = int(self._hosts[block])
        for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
            lo, hi = max(start, b_start + s * lss), min(end, b_start + e * lss)
            if lo >= hi:
                continue
            if bits[s]:
                yield Extent(lo, hi - lo, ExtentKind.DATA, host_offset=host + lo - b_start,
                             file=self.filename)  # fmt: skip
            else:
                yield Extent(lo, hi - lo, ExtentKind.UNALLOCATED)

    def _data_extents(self, start: int, end: int, delta: int) -> Iterator[Extent]:
        """Present guest bytes ``[start, end)`` at file offset + ``delta``; holes read 0."""
        for s, e, is_data in self.host.segments(start + delta, end + delta):
            kind = ExtentKind.DATA if is_data else ExtentKind.ZERO
            yield Extent(s - delta, e - s, kind, host_offset=s, file=self.filename)

    def layer_runs(self, offset: int, end: int) -> Runs:
        """:meth:`layer_extents` as arrays: runs of blocks of one state from the BAT
        window at once; present data cut at the file's holes (which read as zeros),
        partially present blocks by their sector bitmaps, all of them together."""
        from qcowlib.core.layerruns import empty_runs, layer_runs, split_by_holes

        start, end = self._range(offset, end - offset)
        files = (None, self.filename)
        if start == end:
            return empty_runs(files)
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        kinds = self._kinds[first : last + 1]
        hosts = self._hosts[first : last + 1]
        brk = kinds[1:] != kinds[:-1]
        brk |= (kinds[1:] == _KIND_DATA) & (hosts[1:] != hosts[:-1] + bs)
        heads = np.concatenate(([0], np.flatnonzero(brk) + 1))
        stops = np.append(heads[1:], kinds.size)
        g_start = np.maximum(start, (first + heads) * bs)
        g_end = np.minimum(end, (first + stops) * bs)
        r_kind = kinds[heads]
        plain = np.flatnonzero((r_kind == _KIND_ZERO) | (r_kind == _KIND_UNALLOCATED))
        data = np.flatnonzero(r_kind == _KIND_DATA)
        _, d_start, d_len, d_host, d_data = split_by_holes(
            self.host,
            g_start[data],
            g_end[data] - g_start[data],
            hosts[heads[data]] + (g_start[data] - (first + heads[data]) * bs),
        )
        p_start, p_len, p_host, p_data = self._partial_runs(
            np.flatnonzero(kinds == _KIND_PARTIAL) + first, start, end
        )
        plain_kind = np.where(r_kind[plain] == _KIND_ZERO, RUN_ZERO, RUN_UNALLOCATED)
        n_plain = plain.size
        lo = np.concatenate((g_start[plain], d_start, p_start))
        order = np.argsort(lo, kind="stable")
        length = np.concatenate((g_end[plain] - g_start[plain], d_len, p_len))[order]
        host = np.concatenate((np.full(n_plain, -1, np.int64), d_host, p_host))[order]
        kind = np.concatenate(
            (
                plain_kind,
                np.where(d_data, RUN_DATA, RUN_ZERO),
                np.where(p_data, RUN_DATA, RUN_UNALLOCATED),
            )
        ).astype(np.uint8)[order]
        return layer_runs(lo[order], length, kind, host, (host >= 0).astype(np.int64), files)

    def _partial_runs(
        self, blocks: npt.NDArray[np.int64], start: int, end: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], Any]:
        """Runs of partially present ``blocks`` over ``[start, end)`` by their sector
        bitmaps: start, length, host offset (-1: the parent's) and whether present."""
        from qcowlib.core.layerruns import bit_runs

        lss = self.metadata.logical_sector_size
        bs = self.block_size
        nbytes = bs // lss // 8
        parts = []
        step = max(1, _MAX_BITMAP_READ // nbytes)
        for at in range(0, max(1, blocks.size), step):
            chunk = blocks[at : at + step]
            raw = b"".join(
                self.host.pread_exact(int(self._bits_at[b]), nbytes, "vhdx sector bitmap")
                for b in chunk.tolist()
            )
            rows = np.frombuffer(raw, dtype=np.uint8).reshape(chunk.size, nbytes)
            row, bit, count, is_set = bit_runs(rows, nbytes * 8, "little")
            parts.append((chunk[row], bit, count, is_set))
        block, bit, count, is_set = (np.concatenate([p[i] for p in parts]) for i in range(4))
        b_start = block * bs
        lo = np.maximum(start, b_start + bit * lss)
        hi = np.minimum(end, b_start + (bit + count) * lss)
        keep = hi > lo
        lo, hi, is_set, block = lo[keep], hi[keep], is_set[keep], block[keep]
        host = np.where(is_set, self._hosts[block] + lo - block * bs, -1)
        return lo, hi - lo, host, is_set

    # -- reading ------------------------------------------------------------------------
    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        assert ext.host_offset is not None
        self.host.pread_into(ext.host_offset, buf)

    def host_file_for(self, ext: Extent) -> HostFile | None:
        return self.host

    def runs_data_file(self) -> HostFile | None:
        return self.host

    def _close_layer(self) -> None:
        self.host.close()


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> VhdxDisk:
    """The registry's opener."""
    return VhdxDisk(host, path)
