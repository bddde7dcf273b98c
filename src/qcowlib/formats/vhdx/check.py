"""``qemu-img check`` for VHDX images: BAT entries against the file and its regions.

As QEMU's ``vhdx_co_check`` (``vhdx_check_bat_entries``): for every fully present BAT
entry, payload or sector bitmap, the block must start and end inside the file (the last
block may be partial), and a payload block must not overlap the header section, the log,
the BAT or the metadata region.  Each problem is one corruption and one stderr line in
QEMU's words.  The image is opened as QEMU opens it for a check: headers, regions and
metadata must be sound; the BAT is judged here instead of refused.

A log that needs replaying refuses the image read-only (without ``-r``) and is replayed
with ``-r leaks`` or ``-r all``, as QEMU replays it when it opens the image read-write
(:mod:`qcowlib.formats.vhdx.replay`); the replay is one fixed corruption
(``vhdx_co_check``: ``log_replayed_on_open``).
"""

from __future__ import annotations

from collections.abc import Callable

from qcowlib.checkreport import CheckReport
from qcowlib.core.hostfile import HostFile
from qcowlib.formats.vhdx import codec as vhdx
from qcowlib.formats.vhdx.reader import VhdxDisk
from qcowlib.formats.vhdx.replay import replay_log

_INT64_MAX = (1 << 63) - 1
_SECTOR = 512


class _CheckedVhdx(VhdxDisk):
    checking = True


def check_file(host: HostFile, path: str, fix: int, _open: Callable[..., object]) -> CheckReport:
    """Check the VHDX image open as ``host``; with ``fix`` (``host`` writable and
    locked) its log is replayed first, if it has one to replay."""
    import numpy as np

    replayed = replay_log(host) if fix else False
    disk = _CheckedVhdx(host, path)
    m = disk.metadata
    size = host.size
    bat = disk.bat
    states = vhdx.bat_states(bat)
    offsets = vhdx.bat_offsets(bat)  # uint64: offsets up to 2**64 - 1 MiB stay positive
    index = np.arange(bat.size, dtype=np.int64)
    total = (m.virtual_disk_size // m.logical_sector_size) * _SECTOR
    # MIN(block_size, total_sectors * 512 - i * block_size) in QEMU's unsigned arithmetic.
    rest = total - index * m.block_size
    length = np.where((rest >= 0) & (rest < m.block_size), rest, m.block_size)
    payload = (index % (m.chunk_ratio + 1)) != m.chunk_ratio
    regions = [(0, vhdx.VHDX_HEADER_SECTION_END)]
    regions += [(disk.header.log_offset, disk.header.log_offset + disk.header.log_length)]
    regions += [
        (r.file_offset, r.file_offset + r.length) for r in (disk.bat_region, disk.meta_region)
    ]
    messages: list[str] = []
    for i in np.flatnonzero(states == vhdx.PAYLOAD_BLOCK_FULLY_PRESENT).tolist():
        off = int(offsets[i])
        end = off + int(length[i])  # Python integers: no wrapping past 2**64
        if off > _INT64_MAX - m.block_size:
            messages.append(f"VHDX BAT entry {i} offset overflow.")
        if off >= size:
            messages.append(
                f"VHDX BAT entry {i} start offset {off} points after end of file ({size}). "
                "Image has probably been truncated."
            )
        elif end > size:
            messages.append(
                f"VHDX BAT entry {i} end offset {end - 1} points after end of file ({size}). "
                "Image has probably been truncated."
            )
        if payload[i]:
            stop = off + m.block_size
            hit = next(((a, b) for a, b in regions if not (off >= b or stop <= a)), None)
            if hit is not None:
                messages.append(f"VHDX region {off}-{stop} overlaps with region {hit[0]}-{hit[1]}")
    return CheckReport(
        path,
        "vhdx",
        corruptions=len(messages),
        corruptions_fixed=int(replayed),
        repaired=replayed,
        messages=tuple(messages),
    )
