"""VHD ("vpc") images, fixed and dynamic, opened read-only.

Where the footer is looked for, which size the disk has and what is refused follow
QEMU's ``vpc_open`` (see :mod:`qcowlib.formats.vhd.codec`), with these deliberate differences:

* differencing disks (type 4, what Hyper-V and Virtual PC write for checkpoints) are
  read over their parent, named by the parent locators (relative path first) and checked
  by its unique id; QEMU reads them as dynamic disks without their parent, which gives
  wrong content;
* a file with no footer copy at offset 0 whose end footer says "dynamic" is refused as
  corrupt (QEMU would read it as a fixed disk, footer and tables as guest data);
* in an allocated block, a sector whose bit in the block's sector bitmap is clear reads
  as zeros, as the specification says (QEMU ignores the bitmap; it writes every bit set,
  so images it makes read the same either way).
"""

from __future__ import annotations

import threading
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
from qcowlib.errors import BackingMismatch, CorruptImage, QcowlibError, TruncatedImage
from qcowlib.formats.vhd import codec as vhd

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

#: Decoded sector bitmaps kept per image (each stands for one block, 2 MiB by default).
BITMAP_CACHE_ENTRIES = 4096
#: Bytes of sector bitmaps read at once by :meth:`VhdDisk.layer_runs` at most (bounds
#: the memory of one read: a block's bitmap has no size cap, 512 KiB for 2 GiB blocks).
BITMAP_READ_BYTES = 4 << 20

_Runs = tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]


def _all_present(sectors: int) -> bytes:
    """The bitmap of a block whose every sector is present.  Blocks under 4 KiB have no
    bitmap in the file (QEMU's size rule, ``block_size / 4096`` rounded up to sectors,
    gives 0 bytes, and QEMU reads the data right after the BAT entry's sector): all
    their sectors are data, as qemu-img reads and maps them."""
    return b"\xff" * -(-sectors // 8)


def read_footer(host: HostFile) -> tuple[vhd.Footer, int]:
    """The footer QEMU would use and the file offset it was read from.

    See :func:`qcowlib.formats.vhd.codec.locate_footer` and
    :func:`~qcowlib.formats.vhd.codec.footer_problems`: raises :class:`TruncatedImage` for a
    file shorter than a footer, :class:`FormatError` when neither offset 0 nor the end
    holds one, :class:`CorruptImage` for a wrong checksum or disk type,
    :class:`UnsupportedFeature` for differencing disks.
    """
    size = host.size
    if size < vhd.FOOTER_SIZE:
        raise TruncatedImage(
            "file is too short for a VHD footer", file=host.path, structure="vhd footer"
        )
    head = host.pread(0, vhd.FOOTER_SIZE)
    tail = host.pread(size - vhd.FOOTER_SIZE, vhd.FOOTER_SIZE)
    footer, at = vhd.locate_footer(head, tail, size)
    problems = vhd.footer_problems(footer, at)
    if problems:
        raise problems[0]
    return footer, at


class VhdDisk(Disk):
    """A fixed or dynamic VHD image (qemu-img's ``vpc``).

    Raises :class:`QcowlibError` subclasses naming the structure, field and offset at
    fault when the image cannot be read (see :func:`read_footer` and
    :func:`qcowlib.formats.vhd.codec.check_dynamic`).
    """

    format = "vpc"

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename
        self.dynamic: vhd.DynamicHeader | None = None
        self.block_size = 0
        self.bitmap_size = 0
        self.bat: vhd.BatArray = np.zeros(0, dtype=np.uint32)
        self._bitmaps: dict[int, _Runs] = {}
        self._lock = threading.Lock()
        self.differencing = False
        self._parent = ""
        try:
            self.footer, self.footer_offset = read_footer(host)
            self.virtual_size = vhd.virtual_size(self.footer, self.footer_offset)
            self.differencing = self.footer.type == vhd.VHD_TYPE_DIFFERENCING
            if self.footer.type != vhd.VHD_TYPE_FIXED:
                self._open_dynamic()
            if self.differencing:
                self._parent = self._parent_name()
        except QcowlibError as exc:
            raise exc.with_file(filename) from None

    def _open_dynamic(self) -> None:
        size = self.host.size
        at = vhd.dynamic_header_offset(self.footer, size)
        header = vhd.parse_dynamic_header(self.host.pread(at, vhd.DYNAMIC_HEADER_SIZE), at)
        vhd.check_dynamic(header, self.virtual_size, size, at)
        self.dynamic = header
        self.block_size = header.block_size
        self.bitmap_size = vhd.bitmap_size(header.block_size)
        n = header.max_table_entries
        raw = self.host.pread_exact(header.table_offset, n * 4, "vhd bat")
        self.bat = vhd.decode_bat(raw, n)
        vhd.check_bat(self.bat, self.block_size, size, header.table_offset)

    def _parent_name(self) -> str:
        """The parent's file name from the best parent locator (or the header's name)."""
        assert self.dynamic is not None
        for platform, at, length in vhd.parent_locators(self.dynamic, self.host.size):
            name = vhd.locator_path(platform, self.host.pread(at, length))
            if name:
                return name
        name = vhd.parent_name_path(self.dynamic)
        if name is None:
            raise CorruptImage(
                "differencing VHD names no parent (no usable parent locator or name)",
                structure="vhd dynamic header",
                field="parent_locators",
            )
        return name

    @property
    def backing_file_name(self) -> str | None:
        return self._parent if self.differencing else None

    @property
    def backing_file_format(self) -> str | None:
        return "vpc" if self.differencing else None

    def check_parent(self, parent: Disk) -> None:
        """A differencing disk reads only over the parent it was made from: the parent's
        footer ``unique_id`` must be the one recorded (Hyper-V refuses others too)."""
        if not self.differencing:
            return
        assert self.dynamic is not None
        have = parent.footer.uuid if isinstance(parent, VhdDisk) else None
        if have != self.dynamic.parent_uuid:
            raise BackingMismatch(
                f"parent {parent.filename!r} is not the VHD this differencing disk was made "
                "over (its unique id differs): the chain would read wrong data",
                file=self.filename,
                structure="vhd dynamic header",
                field="parent_uuid",
            )

    def info_head(self) -> dict[str, Any]:
        return {"backing-filename-format": "vpc"} if self.differencing else {}

    def info_tail(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.differencing:
            info["full-backing-filename"] = full_backing_filename(self.filename, self._parent)
            info["backing-filename"] = self._parent
        info["dirty-flag"] = False
        return info

    @property
    def subformat(self) -> str:
        """``"fixed"`` or ``"dynamic"`` (qemu-img's ``-o subformat``)."""
        if self.differencing:
            return "differencing"
        return "dynamic" if self.dynamic is not None else "fixed"

    @property
    def cluster_size(self) -> int | None:
        """The block size of a dynamic disk (what ``qemu-img info`` shows), else None."""
        return self.block_size if self.dynamic is not None else None

    @property
    def info_cluster_size(self) -> int | None:
        return self.cluster_size

    # -- mapping ------------------------------------------------------------------------
    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        if start == end:
            return
        if self.dynamic is None:
            # Fixed: guest offset is file offset; holes in the file read as zeros.
            # qemu-img map reports the holes as "data" and "zero" (the format says data,
            # the file system says zero).
            for s, e, is_data in self.host.segments(start, end):
                yield Extent(s, e - s, ExtentKind.DATA, host_offset=s, file=self.filename,
                             hole=not is_data)  # fmt: skip
            return
        bs = self.block_size
        first = start // bs
        last = (end - 1) // bs
        entries = self.bat[first : last + 1]
        absent = self._absent
        pos = start
        for k in np.flatnonzero(entries != vhd.BAT_UNALLOCATED):
            block = first + int(k)
            b_start = block * bs
            if b_start > pos:
                yield Extent(pos, b_start - pos, absent)
                pos = b_start
            b_end = min(end, b_start + bs)
            yield from self._block_extents(block, pos, b_end)
            pos = b_end
        if pos < end:
            yield Extent(pos, end - pos, absent)

    @property
    def _absent(self) -> ExtentKind:
        """What a sector this file does not hold reads as: the parent's data in a
        differencing disk, zeros otherwise."""
        return ExtentKind.UNALLOCATED if self.differencing else ExtentKind.ZERO

    def _block_extents(self, block: int, start: int, end: int) -> Iterator[Extent]:
        """Runs of allocated block ``block`` over guest ``[start, end)``, from its bitmap."""
        bs = self.block_size
        b_start = block * bs
        data_at = int(self.bat[block]) * vhd.SECTOR + self.bitmap_size
        starts, is_set = self._bitmap(block)
        first_sector = (start - b_start) // vhd.SECTOR
        i = int(np.searchsorted(starts, first_sector, side="right")) - 1
        pos = start
        while pos < end:
            run_end = b_start + (int(starts[i + 1]) * vhd.SECTOR if i + 1 < len(starts) else bs)
            stop = min(end, run_end)
            if is_set[i]:
                host = data_at + (pos - b_start)
                yield Extent(pos, stop - pos, ExtentKind.DATA, host_offset=host, file=self.filename)
            else:
                yield Extent(pos, stop - pos, self._absent)
            pos = stop
            i += 1

    def _bitmap(self, block: int) -> _Runs:
        with self._lock:
            cached = self._bitmaps.get(block)
        if cached is not None:
            return cached
        sectors = self.block_size // vhd.SECTOR
        if self.bitmap_size:
            raw = self.host.pread(int(self.bat[block]) * vhd.SECTOR, self.bitmap_size)
        else:
            raw = _all_present(sectors)
        runs = vhd.bitmap_runs(raw, sectors)
        with self._lock:
            if len(self._bitmaps) >= BITMAP_CACHE_ENTRIES:
                self._bitmaps.clear()
            self._bitmaps[block] = runs
        return runs

    def layer_runs(self, offset: int, end: int) -> Runs:
        """:meth:`layer_extents` as arrays: the BAT window decoded at once, the sector
        bitmaps of its allocated blocks turned into runs together."""
        from qcowlib.core.layerruns import empty_runs, layer_runs, split_by_holes

        start, end = self._range(offset, end - offset)
        files = (None, self.filename)
        if start == end:
            return empty_runs(files)
        if self.dynamic is None:  # fixed: the file's holes are "data" and "zero"
            one = np.array([start], dtype=np.int64)
            _, p_start, p_len, p_host, p_data = split_by_holes(
                self.host, one, np.array([end - start], dtype=np.int64), one
            )
            n = p_start.size
            kind = np.full(n, RUN_DATA, dtype=np.uint8)
            return layer_runs(p_start, p_len, kind, p_host, np.ones(n, np.int64), files, ~p_data)
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        alloc = np.flatnonzero(self.bat[first : last + 1] != vhd.BAT_UNALLOCATED) + first
        absent = RUN_UNALLOCATED if self.differencing else RUN_ZERO
        b_start, b_first, b_count, b_set = self._bitmap_runs(alloc)
        # The gaps between allocated blocks, each one run, as layer_extents yields them.
        prev = np.concatenate(([start], (alloc + 1) * bs))[: alloc.size].astype(np.int64)
        g_end = alloc * bs
        tail = np.array([start if not alloc.size else (int(alloc[-1]) + 1) * bs])
        g_start = np.concatenate((prev, tail))
        g_end = np.concatenate((g_end, [end]))
        sector = vhd.SECTOR
        r_lo = np.concatenate((b_start + b_first * sector, g_start))
        r_hi = np.concatenate((b_start + (b_first + b_count) * sector, g_end))
        is_set = np.concatenate((b_set, np.zeros(g_start.size, dtype=np.bool_)))
        lo, hi = np.maximum(r_lo, start), np.minimum(r_hi, end)
        keep = np.flatnonzero(hi > lo)
        keep = keep[np.argsort(lo[keep], kind="stable")]
        lo, hi, is_set, r_lo = lo[keep], hi[keep], is_set[keep], r_lo[keep]
        blk = lo // bs
        data_at = self.bat[np.minimum(blk, self.bat.size - 1)].astype(np.int64) * sector
        host = np.where(is_set, data_at + self.bitmap_size + (lo - blk * bs), -1)
        kind = np.where(is_set, RUN_DATA, absent).astype(np.uint8)
        return layer_runs(lo, hi - lo, kind, host, is_set.astype(np.int64), files)

    def _bitmap_runs(self, alloc: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], ...]:
        """Runs of the sector bitmaps of blocks ``alloc``: each run's block start (guest
        bytes), first sector and sector count in the block, and whether its bits are set."""
        from qcowlib.core.layerruns import bit_runs

        sectors = self.block_size // vhd.SECTOR
        parts = []
        step = max(1, BITMAP_READ_BYTES // max(1, self.bitmap_size))
        for at in range(0, max(1, alloc.size), step):
            blocks = alloc[at : at + step]
            if self.bitmap_size:
                raw = b"".join(
                    self.host.pread(int(self.bat[b]) * vhd.SECTOR, self.bitmap_size)
                    for b in blocks.tolist()
                )
                width = self.bitmap_size
            else:
                width = len(_all_present(sectors))
                raw = _all_present(sectors) * blocks.size
            rows = np.frombuffer(raw, dtype=np.uint8).reshape(blocks.size, width)
            row, first, count, is_set = bit_runs(rows, sectors, "big")
            parts.append((blocks[row] * self.block_size, first, count, is_set))
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))

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


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> VhdDisk:
    """The registry's opener."""
    return VhdDisk(host, path)
