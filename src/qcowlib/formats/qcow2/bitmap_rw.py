"""Persistent dirty bitmaps changed in place: add, remove, clear, enable, disable and
merge, as ``qemu-img bitmap`` does them (qcow2.txt "Bitmaps"; QEMU's
``block/qcow2-bitmap.c``).

A bitmap's data is ``ceil(ceil(virtual size / granularity) / 8)`` bytes, bit ``j`` of
byte ``i`` standing for granularity chunk ``8 * i + j``, cut into clusters listed by
its bitmap table (an entry of 0 reads as all zeros).  Changed bitmaps get new tables
and data clusters, the directory is written anew, the header is switched to it in one
write, and only then are the old clusters freed (as QEMU's
``qcow2_store_persistent_dirty_bitmaps``).  Allocation and refcounts are the in-place
writer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.errors import CorruptImage, InvalidArgument, UnsupportedFeature
from qcowlib.formats.qcow2 import extensions as hext
from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2.allocator import span
from qcowlib.formats.qcow2.bitmap import (
    BITMAP_DIR_ENTRY,
    BME_FLAG_AUTO,
    BME_FLAG_IN_USE,
    BME_MAX_TABLE_SIZE,
    BME_TABLE_ENTRY_FLAG_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BT_DIRTY_TRACKING_BITMAP,
    MAX_BITMAP_NAME,
    MAX_BITMAPS,
    bitmap_tables,
)

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.qcow2.hostio import HostIO
    from qcowlib.formats.qcow2.metadata_write import Qcow2MetadataWriter

__all__ = [
    "BITMAPS",
    "BitmapAction",
    "WriteTracker",
    "default_granularity",
    "read_bitmap_data",
    "remove_all_bitmaps",
]

#: -g limits qemu-img accepts.
MIN_GRANULARITY: Final = 512
MAX_GRANULARITY: Final = 1 << 31


@dataclass(frozen=True)
class BitmapAction:
    """One ``qemu-img bitmap`` operation: ``add``, ``remove``, ``clear``, ``enable``,
    ``disable`` or ``merge`` (with ``source``, a bitmap of this image or, with
    ``source_file``, of another)."""

    op: str
    source: str | None = None


@dataclass
class _Bitmap:
    name: str
    granularity_bits: int
    flags: int
    table_offset: int
    table_size: int
    #: The bitmap's bytes when they changed (None: kept as stored).
    data: np.ndarray | None = None


def default_granularity(cluster_size: int) -> int:
    """bdrv_get_default_bitmap_granularity: the cluster size within [4 KiB, 64 KiB]."""
    return min(65536, max(4096, cluster_size))


def data_size(virtual_size: int, granularity_bits: int) -> int:
    """Bytes of bitmap data for a disk of ``virtual_size``."""
    bits = -(-virtual_size // (1 << granularity_bits))
    return -(-bits // 8)


def read_bitmap_data(
    host: HostIO, offset: int, size: int, cluster_size: int, nbytes: int
) -> np.ndarray:
    """The data of a bitmap whose table of ``size`` entries is at ``offset`` (checked
    against the file before reading), as ``nbytes`` uint8."""
    if size > BME_MAX_TABLE_SIZE or offset % cluster_size or offset + size * 8 > host.size:
        raise CorruptImage("bitmap table is out of bounds", structure="bitmap table")
    table = np.frombuffer(host.pread(offset, size * 8), dtype=">u8").astype(np.uint64)
    out = np.zeros(size * cluster_size, dtype=np.uint8)
    for i, entry in enumerate(table.tolist()):
        at = entry & BME_TABLE_ENTRY_OFFSET_MASK
        if at:
            if at % cluster_size or at + cluster_size > host.size:
                raise CorruptImage("bitmap data cluster is out of bounds", structure="bitmap table")
            out[i * cluster_size : (i + 1) * cluster_size] = np.frombuffer(
                host.pread(at, cluster_size), dtype=np.uint8
            )
        elif entry & BME_TABLE_ENTRY_FLAG_ALL_ONES:
            out[i * cluster_size : (i + 1) * cluster_size] = 0xFF
    if nbytes > out.size:  # the disk grew past what the table covers: the rest is clean
        out = np.concatenate((out, np.zeros(nbytes - out.size, dtype=np.uint8)))
    return out[:nbytes].copy()


def _owned_clusters(host: HostIO, offset: int, size: int, cs: int) -> list[int]:
    """The table's clusters and its data clusters (what freeing the bitmap frees)."""
    owned = list(span(offset, size * 8, cs))
    table = np.frombuffer(host.pread(offset, size * 8), dtype=">u8").astype(np.uint64)
    data = table & np.uint64(BME_TABLE_ENTRY_OFFSET_MASK)
    owned += (data[data != 0] // np.uint64(cs)).astype(np.int64).tolist()
    return owned


class _State:
    """The image's bitmaps while ``qemu-img bitmap`` operations run."""

    def __init__(self, disk: Qcow2MetadataWriter) -> None:
        h = disk.header
        if h.version < 3:
            raise UnsupportedFeature("Cannot store dirty bitmaps in qcow2 v2 files")
        self.disk = disk
        self.cs = disk.cluster_size
        self.freed: list[int] = []
        self.bitmaps: list[_Bitmap] = []
        ext = h.bitmaps
        if ext is not None and h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            raw = disk.host.pread_exact(
                ext.bitmap_directory_offset, ext.bitmap_directory_size, "bitmap directory"
            )
            places = bitmap_tables(raw, ext.nb_bitmaps, self.cs, disk.virtual_size)
            if places is None:
                raise CorruptImage("the bitmap directory is invalid", file=disk.filename)
            for entry, (t_off, t_size) in zip(disk.bitmaps(), places, strict=True):
                self.bitmaps.append(
                    _Bitmap(entry.name, entry.granularity_bits, entry.flags, t_off, t_size)
                )
            self.freed += list(
                span(ext.bitmap_directory_offset, ext.bitmap_directory_size, self.cs)
            )

    def find(self, name: str) -> _Bitmap:
        for bm in self.bitmaps:
            if bm.name == name:
                return bm
        raise InvalidArgument(f"Dirty bitmap '{name}' not found")

    def bits(self, bm: _Bitmap) -> np.ndarray:
        """The bitmap's bytes (a copy; the bitmap stays as stored)."""
        if bm.data is not None:
            return bm.data.copy()
        if bm.flags & BME_FLAG_IN_USE:
            raise InvalidArgument(f"Bitmap '{bm.name}' is inconsistent and cannot be used")
        n = data_size(self.disk.virtual_size, bm.granularity_bits)
        return read_bitmap_data(self.disk.host, bm.table_offset, bm.table_size, self.cs, n)

    def data(self, bm: _Bitmap) -> np.ndarray:
        """The bitmap's bytes, to change: it is written anew when stored."""
        if bm.data is None:
            bm.data = self.bits(bm)
            self._drop_storage(bm)
        return bm.data

    def _drop_storage(self, bm: _Bitmap) -> None:
        if bm.table_offset:
            self.freed += _owned_clusters(self.disk.host, bm.table_offset, bm.table_size, self.cs)
            bm.table_offset = 0

    # -- operations -------------------------------------------------------------------------
    def add(self, name: str, granularity: int) -> None:
        if not name:
            raise InvalidArgument("Bitmap name cannot be empty")
        if len(name.encode("utf-8", "surrogateescape")) > MAX_BITMAP_NAME:
            raise InvalidArgument("Name length exceeds maximum (1023 characters)")
        if any(bm.name == name for bm in self.bitmaps):
            raise InvalidArgument(f"Bitmap already exists: {name}")
        if len(self.bitmaps) >= MAX_BITMAPS:
            raise InvalidArgument("Maximum number of bitmaps reached")
        if (
            granularity < MIN_GRANULARITY
            or granularity > MAX_GRANULARITY
            or (granularity & (granularity - 1))
        ):
            raise InvalidArgument("Granularity must be power of 2 and at least 512")
        gbits = granularity.bit_length() - 1
        n = data_size(self.disk.virtual_size, gbits)
        self.bitmaps.append(_Bitmap(name, gbits, BME_FLAG_AUTO, 0, 0, np.zeros(n, np.uint8)))

    def remove(self, name: str) -> None:
        bm = self.find(name)
        self._drop_storage(bm)
        self.bitmaps.remove(bm)

    def clear(self, name: str) -> None:
        bm = self.find(name)
        self.data(bm)[:] = 0

    def enable(self, name: str, on: bool) -> None:
        bm = self.find(name)
        bm.flags = bm.flags | BME_FLAG_AUTO if on else bm.flags & ~BME_FLAG_AUTO

    def merge(self, name: str, src_bits: np.ndarray, src_gbits: int) -> None:
        bm = self.find(name)
        target = self.data(bm)
        merge_bits(target, bm.granularity_bits, src_bits, src_gbits, self.disk.virtual_size)

    # -- storing ----------------------------------------------------------------------------
    def store(self) -> None:
        disk = self.disk
        for bm in self.bitmaps:
            if bm.data is not None:
                bm.table_offset, bm.table_size = self._write_data(bm.data)
        directory = encode_directory(self.bitmaps)
        h = disk.header
        exts = [e for e in h.extensions if e.type != hext.EXT_BITMAPS]
        autoclear = h.autoclear_features & ~hdr.AUTOCLEAR_BITMAPS
        bitmaps = None
        if self.bitmaps:
            at = disk.alloc_clusters(-(-len(directory) // self.cs))
            disk.check_overlap(at, len(directory), None, "bitmap directory")
            disk.host.pwrite(at, directory)
            disk.flush()
            bitmaps = hext.BitmapsExtension(len(self.bitmaps), len(directory), at)
            index = next(
                (i for i, e in enumerate(exts) if e.type == hext.EXT_FEATURE_TABLE), len(exts)
            )
            exts.insert(index, hext.bitmaps_extension(bitmaps))
            autoclear |= hdr.AUTOCLEAR_BITMAPS
        new = h.replace(autoclear_features=autoclear, bitmaps=bitmaps, extensions=tuple(exts))
        from qcowlib.formats.qcow2.hostio import with_backing

        disk.rewrite_header(with_backing(new, h.backing_file, h.backing_format))
        disk.tables_changed()
        if self.freed:
            disk.allocator.free(np.array(sorted(self.freed), dtype=np.int64))
        disk.flush()

    def _write_data(self, data: np.ndarray) -> tuple[int, int]:
        """A new bitmap table and data clusters for ``data``; returns the table's place."""
        disk, cs = self.disk, self.cs
        n = -(-data.size // cs)
        padded = np.zeros(n * cs, dtype=np.uint8)
        padded[: data.size] = data
        table = np.zeros(n, dtype=np.uint64)
        for i in np.flatnonzero(padded.reshape(n, cs).any(axis=1)).tolist():
            at = disk.alloc_clusters(1)
            disk.check_overlap(at, cs, None, "bitmap data")
            disk.host.pwrite(at, padded[i * cs : (i + 1) * cs].tobytes())
            table[i] = at
        t_at = disk.alloc_clusters(-(-n * 8 // cs))
        disk.check_overlap(t_at, n * 8, None, "bitmap table")
        disk.host.pwrite(t_at, table.astype(">u8").tobytes())
        return t_at, n


def merge_bits(
    target: np.ndarray, tgbits: int, src: np.ndarray, sgbits: int, virtual_size: int
) -> None:
    """OR ``src`` (granularity ``2**sgbits``) into ``target`` (``2**tgbits``): every
    target chunk that meets a set source chunk becomes set."""
    idx = np.flatnonzero(np.unpackbits(src, bitorder="little")).astype(np.int64)
    if not idx.size:
        return
    nbits = -(-virtual_size // (1 << tgbits))
    first = (idx << sgbits) >> tgbits
    last = (((idx + 1) << sgbits) - 1) >> tgbits
    width = int((last - first).max()) + 1
    cover = (first[:, None] + np.arange(width, dtype=np.int64)[None, :]).ravel()
    cover = cover[(cover <= np.repeat(last, width)) & (cover < nbits)]
    bits = np.unpackbits(target, bitorder="little")
    bits[cover] = 1
    target[:] = np.packbits(bits, bitorder="little")[: target.size]


def encode_directory(bitmaps: list[_Bitmap]) -> bytes:
    """The bitmap directory: each entry padded to 8 bytes (no extra data)."""
    out = bytearray()
    for bm in bitmaps:
        name = bm.name.encode("utf-8", "surrogateescape")  # another tool's bytes kept
        out += BITMAP_DIR_ENTRY.build(
            {
                "bitmap_table_offset": bm.table_offset,
                "bitmap_table_size": bm.table_size,
                # an inconsistent bitmap left alone stays marked in use
                "flags": bm.flags,
                "type": BT_DIRTY_TRACKING_BITMAP,
                "granularity_bits": bm.granularity_bits,
                "name_size": len(name),
                "extra_data_size": 0,
            }
        )
        out += name
        out += bytes(-len(out) % 8)
    return bytes(out)


def mark_ranges(data: np.ndarray, gbits: int, ranges: list[tuple[int, int]]) -> None:
    """Set the bits of ``data`` whose chunks meet any ``(offset, length)`` range."""
    bits = np.unpackbits(data, bitorder="little")
    for offset, length in ranges:
        if length > 0:
            bits[offset >> gbits : ((offset + length - 1) >> gbits) + 1] = 1
    data[:] = np.packbits(bits, bitorder="little")[: data.size]


class WriteTracker:
    """Guest writes recorded in the image's enabled persistent bitmaps, as QEMU records
    them: on the first write the enabled bitmaps are marked in use (so a crash leaves
    them flagged inconsistent, not silently stale); when the image is closed the
    written ranges are set in them and the flag is cleared."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.ranges: list[tuple[int, int]] = []

    @classmethod
    def start(cls, disk: Qcow2MetadataWriter) -> WriteTracker:
        h = disk.header
        if h.version < 3 or h.bitmaps is None or not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            return cls([])
        state = _State(disk)
        enabled = [
            b for b in state.bitmaps if b.flags & BME_FLAG_AUTO and not b.flags & BME_FLAG_IN_USE
        ]
        if enabled:
            for bm in enabled:
                bm.flags |= BME_FLAG_IN_USE
            state.store()
        return cls([b.name for b in enabled])

    def note(self, offset: int, length: int) -> None:
        if self.names:
            self.ranges.append((offset, length))

    def finish(self, disk: Qcow2MetadataWriter) -> None:
        """Set the written ranges in the tracked bitmaps and clear their in-use flag."""
        if not self.names:
            return
        state = _State(disk)
        for bm in state.bitmaps:
            if bm.name in self.names and bm.flags & BME_FLAG_IN_USE:
                bm.flags &= ~BME_FLAG_IN_USE
                mark_ranges(state.data(bm), bm.granularity_bits, self.ranges)
        state.store()
        self.names = []


def remove_all_bitmaps(disk: Qcow2MetadataWriter) -> None:
    """Free every bitmap and the directory (``amend -o compat=0.10``)."""
    state = _State(disk)
    for bm in list(state.bitmaps):
        state.remove(bm.name)
    state.store()


class _Bitmaps:
    """The registry's ``bitmap`` part for qcow2."""

    def run(
        self,
        path: str,
        name: str,
        actions: list[BitmapAction],
        granularity: int | None,
        sources: dict[str, tuple[np.ndarray, int]],
    ) -> None:
        """Apply ``actions`` in order to bitmap ``name``; ``sources`` holds the bits and
        granularity bits of merge sources read from other files, by source name."""
        from qcowlib.formats.qcow2.writer import open_rw_layer

        with open_rw_layer(path) as disk:
            state = _State(disk)
            for action in actions:
                try:
                    _apply(state, name, action, granularity, sources)
                except (InvalidArgument, UnsupportedFeature) as exc:
                    exc.message = f"Operation {action.op} on bitmap {name} failed: {exc.message}"
                    exc.args = (exc.message,)
                    raise
            state.store()

    def read(self, disk: Disk, name: str) -> tuple[np.ndarray, int]:
        """The bits and granularity bits of bitmap ``name`` of an open image (a merge
        source in another file, ``-b``)."""
        from qcowlib.formats.qcow2.reader import Qcow2Disk

        if not isinstance(disk, Qcow2Disk):
            raise InvalidArgument(f"{disk.filename} is not a qcow2 image")
        for entry in disk.bitmaps():
            if entry.name == name:
                n = data_size(disk.virtual_size, entry.granularity_bits)
                data = read_bitmap_data(
                    disk.host,
                    entry.bitmap_table_offset,
                    entry.bitmap_table_size,
                    disk.cluster_size,
                    n,
                )
                return data, entry.granularity_bits
        raise InvalidArgument(f"Dirty bitmap '{name}' not found")


def _apply(
    state: _State,
    name: str,
    action: BitmapAction,
    granularity: int | None,
    sources: dict[str, tuple[np.ndarray, int]],
) -> None:
    if action.op == "add":
        state.add(name, granularity or default_granularity(state.cs))
    elif action.op == "remove":
        state.remove(name)
    elif action.op == "clear":
        state.clear(name)
    elif action.op in ("enable", "disable"):
        state.enable(name, action.op == "enable")
    elif action.op == "merge":
        src = action.source or ""
        if src in sources:
            bits, gbits = sources[src]
        else:
            bm = state.find(src)
            bits, gbits = state.bits(bm), bm.granularity_bits
        state.merge(name, bits, gbits)
    else:
        raise InvalidArgument(f"unknown bitmap operation {action.op}")


BITMAPS: Final = _Bitmaps()
