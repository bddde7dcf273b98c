"""``qemu-img check`` for VMDK images: every allocated grain must start inside its file.

As QEMU's ``vmdk_co_check``: the disk is walked a grain at a time (a flat extent at once)
and the first grain whose offset lies at or past the end of its extent file ends the
check with one corruption, the line ``ERROR: cluster offset for sector N points after
EOF`` and ``Check failed: Invalid argument`` (exit 1).  Repair is not supported, as in
QEMU (``qemu-img check -r`` exits 63).  The image is opened as QEMU opens it for a check:
descriptor, headers, grain directory and tables must be sound; grains past the end of
their file are reported here instead of refused.
"""

from __future__ import annotations

from collections.abc import Callable

from qcowlib.checkreport import CheckNotSupported, CheckReport
from qcowlib.core.hostfile import HostFile
from qcowlib.formats.vmdk import reader
from qcowlib.formats.vmdk.reader import VmdkDisk

_SECTOR = 512


class _CheckedVmdk(VmdkDisk):
    checking = True


def _first_grain_past_eof(part: reader._Part) -> int | None:
    """The guest sector (in the part) of its first allocated grain past the file's end."""
    import numpy as np

    h, host = part.header, part.host
    assert h is not None and host is not None
    limit = -(-host.size // _SECTOR)  # first sector at or past the end of the file
    start, kind, sector = part.run_start, part.run_kind, part.run_sector
    count = np.diff(np.append(start, h.num_grains))
    data = (kind == reader._DATA) | (kind == reader._COMPRESSED)
    # Grain j of a data run lies at sector[i] + j * grain_size (one grain when compressed).
    skip = np.maximum(0, -(-(limit - sector) // h.grain_size))
    bad = np.flatnonzero(data & (skip < count))
    if not bad.size:
        return None
    i = int(bad[0])
    return (int(start[i]) + int(skip[i])) * h.grain_size


def check_file(host: HostFile, path: str, fix: int, _open: Callable[..., object]) -> CheckReport:
    """Check the VMDK image open as ``host`` and its extent files."""
    if fix:
        raise CheckNotSupported("vmdk images cannot be repaired", file=path)
    disk = _CheckedVmdk(host, path)
    try:
        for part in disk.parts:
            base = part.start // _SECTOR
            if part.kind == "flat" and part.host is not None:
                bad = 0 if part.flat_offset >= part.host.size else None
            elif part.kind == "sparse" and part.header is not None and part.header.capacity:
                bad = _first_grain_past_eof(part)
            else:
                bad = None
            if bad is not None:
                return CheckReport(
                    path,
                    "vmdk",
                    corruptions=1,
                    failure="Check failed: Invalid argument",
                    messages=(f"ERROR: cluster offset for sector {base + bad} points after EOF",),
                )
    finally:
        disk._close_extents()
    return CheckReport(path, "vmdk")
