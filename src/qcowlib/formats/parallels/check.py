"""``check`` of a Parallels image, as ``qemu-img check`` does it (QEMU 7.2
``block/parallels.c``: ``parallels_co_check``, ``parallels_open``, ``parallels_close``).

* An image whose ``inuse`` field says it was not closed cleanly is one corruption
  (repaired with ``-r all`` by writing the field back as closed).
* A BAT entry that points past the end of the file is a corruption ("cluster N is
  outside image"; ``-r all`` clears the entry).
* The file past the last allocated cluster (``image-end-offset``) is leaked space,
  counted in clusters (``-r leaks``/``-r all`` truncate the file there).
* ``total-clusters`` is the BAT size, ``allocated-clusters`` the entries in use,
  ``fragmented-clusters`` those that do not follow the previous entry's cluster.

As qemu-img opens the image read-write to repair it, a repair also leaves the header's
``inuse`` field cleared and the file cut (or extended) to the end of its data area, as
``parallels_close`` does; qcowlib extends a file by at most :data:`MAX_REPAIR_GROWTH`
there (a BAT entry past the end of the file makes QEMU extend it to any size).

Sizes are those of the file rounded up to whole sectors, as QEMU sees them.  A repair
that fixed something is followed by a second, read-only pass, whose counts are reported
with the fixed ones.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from qcowlib.checkreport import CheckReport
from qcowlib.formats.parallels import codec as prl
from qcowlib.formats.parallels.reader import read_extension, read_header

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.core.hostfile import HostFile

__all__ = ["check_file"]

#: BdrvCheckMode bits (QEMU ``BDRV_FIX_LEAKS``, ``BDRV_FIX_ERRORS``).
BDRV_FIX_LEAKS = 1
BDRV_FIX_ERRORS = 2
_INUSE_AT = 44
#: How far a repair may extend the file to the data area's end (see above).
MAX_REPAIR_GROWTH = 1 << 30


def _length(host: HostFile) -> int:
    """The file's size as QEMU's ``bdrv_getlength`` sees it (whole sectors)."""
    return -(-host.size // prl.SECTOR) * prl.SECTOR


@dataclass
class _Result:
    corruptions: int = 0
    corruptions_fixed: int = 0
    leaks: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    messages: list[str] = field(default_factory=list)


def _check_pass(host: HostFile, h: prl.ParallelsHeader, unclean: bool, fix: int) -> _Result:
    """One ``parallels_co_check`` (``fix``: BDRV_FIX_* bits, ``host`` writable)."""
    import numpy as np

    res = _Result()
    size = _length(host)
    errors = "Repairing" if fix & BDRV_FIX_ERRORS else "ERROR"
    if unclean:
        res.messages.append(f"{errors} image was not closed correctly")
        res.corruptions += 1
        if fix & BDRV_FIX_ERRORS:
            res.corruptions_fixed += 1
    res.total_clusters = h.bat_entries
    raw = host.pread_exact(prl.HEADER_SIZE, h.bat_bytes, "parallels bat")
    bat = prl.decode_bat(raw, h.bat_entries, prl.HEADER_SIZE).copy()
    offsets = prl.bat_offsets(h, bat)
    outside = np.flatnonzero(offsets > size)
    for i in outside.tolist():
        res.messages.append(f"{errors} cluster {i} is outside image")
    res.corruptions += int(outside.size)
    if outside.size and fix & BDRV_FIX_ERRORS:
        res.corruptions_fixed += int(outside.size)
        bat[outside] = 0
        offsets[outside] = 0
        host.pwrite(prl.HEADER_SIZE, bat.astype(np.dtype("<u4")).tobytes())
    used = np.flatnonzero(offsets)
    res.allocated_clusters = int(used.size)
    # An entry is fragmented when the entry just before it is allocated too and its
    # cluster does not end where this one starts.
    prev_used = used[1:][used[1:] - 1 == used[:-1]]
    follows = offsets[prev_used - 1] + h.cluster_size == offsets[prev_used]
    res.fragmented_clusters = int(np.count_nonzero(~follows))
    high_off = int(offsets.max()) if offsets.size else 0
    res.image_end_offset = high_off + h.cluster_size
    if size > res.image_end_offset:
        count = -(-(size - res.image_end_offset) // h.cluster_size)
        leaks = "Repairing" if fix & BDRV_FIX_LEAKS else "ERROR"
        res.messages.append(
            f"{leaks} space leaked at the end of the image {size - res.image_end_offset}"
        )
        res.leaks += count
        if fix & BDRV_FIX_LEAKS:
            host.truncate(res.image_end_offset)
            res.leaks_fixed += count
    return res


def _data_end(host: HostFile, h: prl.ParallelsHeader) -> int:
    """``BDRVParallelsState.data_end`` as ``parallels_open`` computes it, in bytes."""
    import numpy as np

    end = h.data_off or -(-(prl.HEADER_SIZE + h.bat_bytes) // prl.SECTOR)
    raw = host.pread_exact(prl.HEADER_SIZE, h.bat_bytes, "parallels bat")
    sectors = prl.bat_offsets(h, prl.decode_bat(raw, h.bat_entries, prl.HEADER_SIZE)) // prl.SECTOR
    if sectors.size:
        last = int(sectors.max())
        if last >= end:
            end = last + h.tracks
    return int(np.int64(end)) * prl.SECTOR


def check_file(
    host: HostFile, path: str, fix: int, open_backing: Callable[[str, str | None], Disk]
) -> CheckReport:
    """The registry's Parallels checker (``fix``: 0, or BDRV_FIX_* bits with ``host``
    writable).  Without ``fix`` the Format Extension must be readable, as qemu-img's
    read-only open requires; qemu-img ignores it when it opens the image to repair."""
    h = read_header(host)
    if not fix:
        read_extension(host, h)
    data_end = _data_end(host, h) if fix else 0
    res = _check_pass(host, h, h.unclean, fix)
    messages = list(res.messages)
    repaired = bool(res.corruptions_fixed or res.leaks_fixed)
    if repaired:
        unclean = h.unclean and not fix & BDRV_FIX_ERRORS
        second = _check_pass(host, read_header(host), unclean, 0)
        messages += second.messages
        res = replace(second, corruptions_fixed=res.corruptions_fixed, leaks_fixed=res.leaks_fixed)
    if fix:
        # parallels_close: mark the image closed and cut it to its data area.
        host.pwrite(_INUSE_AT, struct.pack("<I", 0))
        if data_end <= host.size + MAX_REPAIR_GROWTH:
            host.truncate(data_end)
        host.sync()
    return CheckReport(
        filename=path,
        format="parallels",
        corruptions=res.corruptions,
        leaks=res.leaks,
        corruptions_fixed=res.corruptions_fixed,
        leaks_fixed=res.leaks_fixed,
        image_end_offset=res.image_end_offset,
        total_clusters=res.total_clusters,
        allocated_clusters=res.allocated_clusters,
        fragmented_clusters=res.fragmented_clusters,
        repaired=repaired,
        messages=tuple(messages),
    )
