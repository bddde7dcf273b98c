"""The one writer of new VHDX images (``convert -O vhdx``, ``flatten``, its stream).

The layout is ``qemu-img create``'s (QEMU ``vhdx_co_create``): the file type identifier,
two headers (sequence numbers ``n`` and ``n + 1``, an empty log) and two identical region
tables in the first 320 KiB; a 1 MiB log at 1 MiB; the BAT at 2 MiB (rounded up to whole
MiB); a 1 MiB metadata region after it; payload blocks from 5 MiB past the end of the
BAT, all 1 MiB aligned.  The block size is QEMU's default for the size (8 MiB up to
1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, 64 MiB above), sectors are 512 bytes.

* fixed: every payload block is ``FULLY_PRESENT`` and contiguous, so the guest data is
  the file from the first block on; the file ends with the disk (QEMU's size), and the
  metadata says ``leave_blocks_allocated``;
* dynamic: blocks whose source content is all zeros are left ``NOT_PRESENT`` (QEMU
  marks them ``ZERO`` by default; both read as zeros, and ``NOT_PRESENT`` is what
  Hyper-V writes); the others are appended in guest order, with all-zero 4 KiB runs
  inside them left as holes in a file.

:class:`VhdxLayout` places the data and builds the metadata (identifiers drawn once, so
a layout's file and stream are the same bytes); :mod:`qcowlib.core.emit` writes it.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from qcowlib.core.disk import Disk
from qcowlib.core.emit import Record, write_file
from qcowlib.core.plan import DATA, Chunk, Classifier, candidate_units, data_runs
from qcowlib.errors import InvalidArgument
from qcowlib.formats.vhdx import codec as vhdx

Progress = Callable[[int, int], None]
SUBFORMATS = ("dynamic", "fixed")
#: Zero runs inside a block shorter than this are written (qemu-img convert's -S default).
SPARSE_SIZE = 4096
SECTOR = 512
LOG_SIZE = vhdx.MIB
#: QEMU leaves this much room past the BAT for the metadata region and its growth.
_DATA_GAP = 5 * vhdx.MIB
#: Read buffers for dynamic images (each one block of up to 64 MiB).
_BLOCK_BUFFERS = 4
CREATOR = "qcowlib"


def default_block_size(size: int) -> int:
    """The block size ``qemu-img create -f vhdx`` picks for a disk of ``size`` bytes."""
    if size > 32 << 40:
        return 64 * vhdx.MIB
    if size > 100 << 30:
        return 32 * vhdx.MIB
    if size > 1 << 30:
        return 16 * vhdx.MIB
    return 8 * vhdx.MIB


def _round_mib(n: int) -> int:
    return -(-n // vhdx.MIB) * vhdx.MIB


class VhdxLayout:
    """A new VHDX of ``src``: ``subformat`` ``"dynamic"`` or ``"fixed"``; the virtual size
    is ``src``'s rounded up to whole sectors.  Raises :class:`InvalidArgument` for a bad
    subformat or a size above 64 TiB."""

    stage = False

    def __init__(self, src: Disk, *, subformat: str = "dynamic") -> None:
        if subformat not in SUBFORMATS:
            raise InvalidArgument(f"VHDX subformat {subformat!r} is not one of {SUBFORMATS}")
        size = -(-src.virtual_size // SECTOR) * SECTOR
        if size > vhdx.VHDX_MAX_SIZE:
            raise InvalidArgument(f"VHDX images are limited to 64 TiB, not {size} bytes")
        self.src = src
        self.virtual_size = size
        self.fixed = fixed = subformat == "fixed"
        self.meta = vhdx.Metadata(
            block_size=default_block_size(size),
            leave_blocks_allocated=fixed,
            has_parent=False,
            virtual_disk_size=size,
            logical_sector_size=SECTOR,
            physical_sector_size=SECTOR,
            page83=uuid.uuid4().bytes_le,
        )
        bs = self.block_size = self.meta.block_size
        self.n_blocks = -(-size // bs)
        self.entries = vhdx.bat_entries(size, bs, self.meta.chunk_ratio, has_parent=False)
        self.bat_offset = vhdx.VHDX_HEADER_SECTION_END + LOG_SIZE
        self.bat_length = max(vhdx.MIB, _round_mib(self.entries * 8))
        self.meta_offset = self.bat_offset + self.bat_length
        self.data_start = self.bat_offset + self.bat_length + _DATA_GAP
        self.index = vhdx.payload_bat_index(0, self.n_blocks, self.meta.chunk_ratio)
        # Fixed: the guest data is the file from the first block on, zero runs holes.
        self.unit = SPARSE_SIZE if fixed else bs
        self.holes = 0 if fixed else SPARSE_SIZE
        self.header = vhdx.Header(
            sequence_number=secrets.randbits(32),
            file_write_guid=uuid.uuid4().bytes_le,
            data_write_guid=uuid.uuid4().bytes_le,
            log_guid=bytes(16),
            log_version=0,
            version=1,
            log_length=LOG_SIZE,
            log_offset=vhdx.VHDX_HEADER_SECTION_END,
        )
        self._ranges = candidate_units(src, self.unit)
        self.begin(stream=False)

    def ranges(self) -> list[tuple[int, int]]:
        return self._ranges

    def reserved(self) -> int:
        return 0

    def classifier(self) -> Classifier:
        buffers = _BLOCK_BUFFERS if self.unit > 4 * vhdx.MIB else 12
        return Classifier(self.src, self.src.virtual_size, self.unit, buffers=buffers)

    def begin(self, stream: bool) -> None:
        self.bat = np.zeros(self.entries, dtype=np.uint64)
        self.next_free = self.data_start
        if self.fixed:
            bs = self.block_size
            offsets = self.data_start + np.arange(self.n_blocks, dtype=np.uint64) * np.uint64(bs)
            self.bat[self.index] = offsets | np.uint64(vhdx.PAYLOAD_BLOCK_FULLY_PRESENT)
            self.next_free = self.data_start + self.virtual_size

    def place(self, chunk: Chunk) -> list[Record]:
        u = self.unit
        out: list[Record] = []
        if self.fixed:
            for s, e in data_runs(chunk.kinds):
                start = (chunk.first + s) * u
                end = min((chunk.first + e) * u, self.virtual_size)
                out.append((self.data_start + start, chunk.data[s * u : s * u + end - start]))
            return out
        for i in np.flatnonzero(chunk.kinds == DATA).tolist():
            entry = self.next_free | vhdx.PAYLOAD_BLOCK_FULLY_PRESENT
            self.bat[self.index[chunk.first + i]] = np.uint64(entry)
            out.append((self.next_free, chunk.data[i * u : (i + 1) * u]))
            self.next_free += u
        return out

    def early(self) -> list[Record]:
        return []

    def finish(self) -> list[Record]:
        """Everything but the payload (a file gets it last: a failed copy leaves no
        valid image)."""
        entries, items = vhdx.build_metadata_items(self.meta)
        regions = vhdx.build_region_table(
            [
                vhdx.RegionEntry(
                    vhdx.VHDX_BAT_GUID, self.bat_offset, self.bat_length, required=True
                ),
                vhdx.RegionEntry(
                    vhdx.VHDX_METADATA_GUID, self.meta_offset, vhdx.MIB, required=True
                ),
            ]
        )
        second = replace(self.header, sequence_number=self.header.sequence_number + 1)
        out: list[Record] = [
            (self.meta_offset, vhdx.build_metadata_table(entries)),
            (self.meta_offset + vhdx.VHDX_METADATA_TABLE_SIZE, items),
            (self.bat_offset, vhdx.encode_bat(self.bat)),
        ]
        out += [(at, regions) for at in vhdx.VHDX_REGION_TABLE_OFFSETS]
        out.append((vhdx.VHDX_HEADER_OFFSETS[0], vhdx.build_header(self.header)))
        out.append((vhdx.VHDX_HEADER_OFFSETS[1], vhdx.build_header(second)))
        out.append((0, vhdx.build_file_identifier(CREATOR)))
        return out

    def size(self) -> int:
        return self.next_free


def write_vhdx(
    src: Disk, fd: int, *, subformat: str = "dynamic", progress: Progress | None = None
) -> int:
    """Write ``src``'s content into ``fd`` (a fresh, empty file) as a new VHDX image.

    ``subformat`` is ``"dynamic"`` or ``"fixed"``.  The virtual size is ``src``'s,
    rounded up to whole sectors.  Returns the file size.  Raises
    :class:`InvalidArgument` for a bad subformat or a size above 64 TiB, and
    :class:`QcowlibIOError` when writing fails.
    """
    return write_file(VhdxLayout(src, subformat=subformat), fd, progress=progress)
