"""Writing a new VHDX image from a source disk (``convert -O vhdx``).

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
  inside them left as holes.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import aligned_buffer, pwrite_all
from qcowlib.core.zero import is_zero, nonzero_runs
from qcowlib.errors import InvalidArgument, QcowlibIOError
from qcowlib.formats.vhdx import codec as vhdx

Progress = Callable[[int, int], None]
SUBFORMATS = ("dynamic", "fixed")
#: Zero runs inside a block shorter than this are written (qemu-img convert's -S default).
SPARSE_SIZE = 4096
SECTOR = 512
LOG_SIZE = vhdx.MIB
#: QEMU leaves this much room past the BAT for the metadata region and its growth.
_DATA_GAP = 5 * vhdx.MIB
#: Fixed images are copied in pieces of this size.
_CHUNK = 4 * vhdx.MIB
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


def _pwrite(fd: int, data: memoryview | bytes | bytearray, offset: int) -> None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as exc:
        raise QcowlibIOError(f"write error: {exc.strerror}", offset=offset) from None


def write_vhdx(
    src: Disk, fd: int, *, subformat: str = "dynamic", progress: Progress | None = None
) -> int:
    """Write ``src``'s content into ``fd`` (a fresh, empty file) as a new VHDX image.

    ``subformat`` is ``"dynamic"`` or ``"fixed"``.  The virtual size is ``src``'s,
    rounded up to whole sectors.  Returns the file size.  Raises
    :class:`InvalidArgument` for a bad subformat or a size above 64 TiB, and
    :class:`QcowlibIOError` when writing fails.
    """
    if subformat not in SUBFORMATS:
        raise InvalidArgument(f"VHDX subformat {subformat!r} is not one of {SUBFORMATS}")
    size = -(-src.virtual_size // SECTOR) * SECTOR
    if size > vhdx.VHDX_MAX_SIZE:
        raise InvalidArgument(f"VHDX images are limited to 64 TiB, not {size} bytes")
    fixed = subformat == "fixed"
    meta = vhdx.Metadata(
        block_size=default_block_size(size),
        leave_blocks_allocated=fixed,
        has_parent=False,
        virtual_disk_size=size,
        logical_sector_size=SECTOR,
        physical_sector_size=SECTOR,
        page83=uuid.uuid4().bytes_le,
    )
    bs = meta.block_size
    ratio = meta.chunk_ratio
    n_blocks = -(-size // bs)
    entries = vhdx.bat_entries(size, bs, ratio, has_parent=False)
    bat_offset = vhdx.VHDX_HEADER_SECTION_END + LOG_SIZE
    bat_length = max(vhdx.MIB, _round_mib(entries * 8))
    meta_offset = bat_offset + bat_length
    data_start = bat_offset + bat_length + _DATA_GAP
    bat = np.zeros(entries, dtype=np.uint64)
    index = vhdx.payload_bat_index(0, n_blocks, ratio)
    if fixed:
        offsets = data_start + np.arange(n_blocks, dtype=np.uint64) * np.uint64(bs)
        bat[index] = offsets | np.uint64(vhdx.PAYLOAD_BLOCK_FULLY_PRESENT)
        end = data_start + size
        _truncate(fd, end)
        _copy_fixed(src, fd, data_start, size, progress)
    else:
        end = _write_dynamic(src, fd, bat, index, bs, data_start, size, progress)
    _write_metadata_structures(fd, meta, bat, bat_offset, bat_length, meta_offset)
    _truncate(fd, end)
    if progress:
        progress(size, size)
    return end


def _truncate(fd: int, end: int) -> None:
    try:
        os.ftruncate(fd, end)
    except OSError as exc:
        raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None


def _copy_fixed(src: Disk, fd: int, data_start: int, size: int, progress: Progress | None) -> None:
    view = aligned_buffer(_CHUNK)
    src_size = src.virtual_size
    for ext in src.extents():
        if ext.reads_zero:
            continue
        pos = ext.start
        while pos < ext.end:
            n = min(_CHUNK, ext.end - pos)
            part = view[:n]
            src.read_extent(ext.clip(pos, pos + n), part)
            for s, e in nonzero_runs(part, SPARSE_SIZE):
                _pwrite(fd, part[s:e], data_start + pos + s)
            pos += n
            if progress:
                progress(min(pos, src_size), size)


def _write_dynamic(
    src: Disk,
    fd: int,
    bat: vhdx.BatArray,
    index: np.ndarray,
    bs: int,
    data_start: int,
    size: int,
    progress: Progress | None,
) -> int:
    n_blocks = index.size
    candidates = np.zeros(n_blocks, dtype=np.bool_)
    for ext in src.extents():
        if not ext.reads_zero:
            candidates[ext.start // bs : -(-ext.end // bs)] = True
    next_free = data_start
    view = aligned_buffer(bs)
    src_size = src.virtual_size
    for block in np.flatnonzero(candidates).tolist():
        start = block * bs
        length = min(bs, src_size - start)
        if length <= 0:
            continue
        part = view[:length]
        src.read_into(start, part)
        if is_zero(part):
            continue
        bat[index[block]] = np.uint64(next_free | vhdx.PAYLOAD_BLOCK_FULLY_PRESENT)
        for s, e in nonzero_runs(part, SPARSE_SIZE):
            _pwrite(fd, part[s:e], next_free + s)
        next_free += bs
        if progress:
            progress(start + length, size)
    return next_free


def _write_metadata_structures(
    fd: int,
    meta: vhdx.Metadata,
    bat: vhdx.BatArray,
    bat_offset: int,
    bat_length: int,
    meta_offset: int,
) -> None:
    """Everything but the payload: written last, so a failed copy leaves no valid image."""
    entries, items = vhdx.build_metadata_items(meta)
    _pwrite(fd, vhdx.build_metadata_table(entries), meta_offset)
    _pwrite(fd, items, meta_offset + vhdx.VHDX_METADATA_TABLE_SIZE)
    _pwrite(fd, vhdx.encode_bat(bat), bat_offset)
    regions = vhdx.build_region_table(
        [
            vhdx.RegionEntry(vhdx.VHDX_BAT_GUID, bat_offset, bat_length, required=True),
            vhdx.RegionEntry(vhdx.VHDX_METADATA_GUID, meta_offset, vhdx.MIB, required=True),
        ]
    )
    for at in vhdx.VHDX_REGION_TABLE_OFFSETS:
        _pwrite(fd, regions, at)
    seq = secrets.randbits(32)
    header = vhdx.Header(
        sequence_number=seq,
        file_write_guid=uuid.uuid4().bytes_le,
        data_write_guid=uuid.uuid4().bytes_le,
        log_guid=bytes(16),
        log_version=0,
        version=1,
        log_length=LOG_SIZE,
        log_offset=vhdx.VHDX_HEADER_SECTION_END,
    )
    _pwrite(fd, vhdx.build_header(header), vhdx.VHDX_HEADER_OFFSETS[0])
    second = replace(header, sequence_number=seq + 1)
    _pwrite(fd, vhdx.build_header(second), vhdx.VHDX_HEADER_OFFSETS[1])
    _pwrite(fd, vhdx.build_file_identifier(CREATOR), 0)
