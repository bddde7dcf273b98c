"""The one writer of new VHD ("vpc") images (``convert -O vpc``, ``flatten``, its stream).

The layout is QEMU's (``vpc_co_create`` and ``alloc_block``): a fixed disk is the data
then the footer; a dynamic disk is a footer copy at 0, the dynamic disk header at 512,
the BAT at 1536 (padded to whole sectors), then one 2 MiB block per allocated block,
each preceded by a sector bitmap with every bit set, and the footer at the end.  Blocks
whose source content is all zeros are left unallocated; inside allocated blocks,
all-zero 4 KiB runs are not written to a file (they stay holes).  :class:`VhdLayout`
places the data and builds the metadata; :mod:`qcowlib.core.emit` writes it to a file
or a stream (whose size is known once the source's blocks are classified).

The size is kept exactly: when the source size is CHS-exact the footer is the one
``qemu-img create`` writes (creator ``qemu``, that geometry); otherwise it is the one
``-o force_size=on`` writes (creator ``qem2``, the largest geometry, ``current_size``
the source size), which QEMU, Hyper-V and qcowlib all size by ``current_size``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import numpy as np

from qcowlib.core.disk import Disk
from qcowlib.core.emit import Record, write_file
from qcowlib.core.plan import DATA, Chunk, Classifier, candidate_units, data_runs
from qcowlib.errors import InvalidArgument, QcowlibError
from qcowlib.formats.vhd import codec as vhd

Progress = Callable[[int, int], None]
SUBFORMATS = ("dynamic", "fixed")
#: Zero runs inside a block shorter than this are written (qemu-img convert's -S default).
SPARSE_SIZE = 4096
_CREATOR_VER = 0x00050003  # Virtual PC 2007, as QEMU writes it
_VERSION = 0x00010000
_FEATURES_RESERVED = 0x2  # the "reserved" feature bit the specification says is always set


def vhd_footer(size: int, disk_type: int, *, timestamp: int | None = None) -> vhd.Footer:
    """The footer of a new image of exactly ``size`` bytes (a multiple of 512).

    Raises :class:`InvalidArgument` for sizes that are not whole sectors or are above
    2040 GiB.
    """
    if size < 0 or size % vhd.SECTOR:
        raise InvalidArgument(f"VHD size {size} is not a multiple of 512")
    try:
        cyls, heads, secs, total = vhd.create_geometry(size)
        force_size = total * vhd.SECTOR != size
        if force_size:
            cyls, heads, secs, total = vhd.create_geometry(size, force_size=True)
    except QcowlibError as exc:
        raise InvalidArgument(f"cannot create a VHD of {size} bytes: {exc.message}") from None
    if timestamp is None:
        timestamp = max(0, int(time.time()) - vhd.VHD_TIMESTAMP_BASE) & 0xFFFFFFFF
    dynamic = disk_type == vhd.VHD_TYPE_DYNAMIC
    return vhd.Footer(
        features=_FEATURES_RESERVED,
        version=_VERSION,
        data_offset=vhd.FOOTER_SIZE if dynamic else vhd.NO_DATA_OFFSET,
        timestamp=timestamp,
        creator_app=b"qem2" if force_size else b"qemu",
        creator_ver=_CREATOR_VER,
        creator_os=b"Wi2k",
        orig_size=size,
        current_size=size,
        cyls=cyls,
        heads=heads,
        secs_per_cyl=secs,
        type=disk_type,
        checksum=0,
        uuid=uuid.uuid4().bytes,
        in_saved_state=0,
    )


class VhdLayout:
    """A new VHD of ``src``: ``subformat`` ``"dynamic"`` or ``"fixed"``; the virtual size
    is ``src``'s rounded up to whole sectors.  Raises :class:`InvalidArgument` for a bad
    subformat or a size above 2040 GiB."""

    stage = False

    def __init__(self, src: Disk, *, subformat: str = "dynamic") -> None:
        if subformat not in SUBFORMATS:
            raise InvalidArgument(f"VHD subformat {subformat!r} is not one of {SUBFORMATS}")
        self.src = src
        self.fixed = subformat == "fixed"
        self.virtual_size = size = -(-src.virtual_size // vhd.SECTOR) * vhd.SECTOR
        disk_type = vhd.VHD_TYPE_FIXED if self.fixed else vhd.VHD_TYPE_DYNAMIC
        self.footer = vhd.build_footer(vhd_footer(size, disk_type))
        if self.fixed:
            # The data is the disk itself, from offset 0; zero blocks stay holes.
            self.unit, self.holes, self.data_start = SPARSE_SIZE, 0, 0
        else:
            bs = self.unit = vhd.DEFAULT_BLOCK_SIZE
            self.holes = SPARSE_SIZE
            self.n_blocks = -(-size // bs)
            self.table_offset = vhd.FOOTER_SIZE + vhd.DYNAMIC_HEADER_SIZE
            bat_bytes = len(vhd.encode_bat(np.zeros(self.n_blocks, dtype=np.uint32)))
            self.data_start = self.table_offset + bat_bytes
            self.bitmap = b"\xff" * vhd.bitmap_size(bs)
        self._ranges = candidate_units(src, self.unit)
        self.begin(stream=False)

    def ranges(self) -> list[tuple[int, int]]:
        return self._ranges

    def reserved(self) -> int:
        return 0

    def classifier(self) -> Classifier:
        return Classifier(self.src, self.src.virtual_size, self.unit)

    def begin(self, stream: bool) -> None:
        self.next_free = self.data_start
        if not self.fixed:
            self.bat = np.full(self.n_blocks, vhd.BAT_UNALLOCATED, dtype=np.uint32)

    def place(self, chunk: Chunk) -> list[Record]:
        u = self.unit
        out: list[Record] = []
        if self.fixed:
            for s, e in data_runs(chunk.kinds):
                start = (chunk.first + s) * u
                end = min((chunk.first + e) * u, self.virtual_size)
                out.append((start, chunk.data[s * u : s * u + end - start]))
            return out
        for i in np.flatnonzero(chunk.kinds == DATA).tolist():
            self.bat[chunk.first + i] = self.next_free // vhd.SECTOR
            out.append((self.next_free, self.bitmap))
            out.append((self.next_free + len(self.bitmap), chunk.data[i * u : (i + 1) * u]))
            self.next_free += len(self.bitmap) + u
        return out

    def early(self) -> list[Record]:
        return []

    def finish(self) -> list[Record]:
        if self.fixed:
            return [(self.virtual_size, self.footer)]
        header = vhd.build_dynamic_header(
            vhd.DynamicHeader(
                data_offset=vhd.NO_DATA_OFFSET,
                table_offset=self.table_offset,
                version=_VERSION,
                max_table_entries=self.n_blocks,
                block_size=self.unit,
                checksum=0,
            )
        )
        return [
            (0, self.footer),
            (vhd.FOOTER_SIZE, header),
            (self.table_offset, vhd.encode_bat(self.bat)),
            (self.next_free, self.footer),
        ]

    def size(self) -> int:
        end = self.virtual_size if self.fixed else self.next_free
        return end + vhd.FOOTER_SIZE


def write_vhd(
    src: Disk, fd: int, *, subformat: str = "dynamic", progress: Progress | None = None
) -> int:
    """Write ``src``'s content into ``fd`` (a fresh, empty file) as a new VHD image.

    ``subformat`` is ``"dynamic"`` or ``"fixed"``.  The virtual size is ``src``'s,
    rounded up to whole sectors.  Returns the file size.  Raises
    :class:`InvalidArgument` for a bad subformat or a size above 2040 GiB, and
    :class:`QcowlibIOError` when writing fails.
    """
    return write_file(VhdLayout(src, subformat=subformat), fd, progress=progress)
