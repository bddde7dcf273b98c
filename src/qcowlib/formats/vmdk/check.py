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


def _first_bad_grain(part: reader._Part) -> tuple[int, bool] | None:
    """The guest sector (in the part) where QEMU's check stops, and whether it is a grain
    QEMU cannot map (else a grain past the end of its file)."""
    assert part.host is not None and part.grains is not None
    bad = part.grains.first_bad(part.host.size)
    return None if bad is None else (bad[0] * part.grain_size, bad[1])


def check_file(host: HostFile, path: str, fix: int, _open: Callable[..., object]) -> CheckReport:
    """Check the VMDK image open as ``host`` and its extent files."""
    if fix:
        raise CheckNotSupported("vmdk images cannot be repaired", file=path)
    disk = _CheckedVmdk(host, path)
    try:
        for part in disk.parts:
            base = part.start // _SECTOR
            bad: tuple[int, bool] | None = None
            if part.kind == "flat" and part.host is not None:
                bad = (0, False) if part.flat_offset >= part.host.size else None
            elif part.kind == "sparse" and part.grains is not None:
                bad = _first_bad_grain(part)
            if bad is not None:
                sector, unmapped = base + bad[0], bad[1]
                if unmapped:  # QEMU's VMDK_ERROR (-1) ends the check as -EPERM
                    failure = "Check failed: Operation not permitted"
                    message = f"ERROR: could not get cluster_offset for sector {sector}"
                else:
                    failure = "Check failed: Invalid argument"
                    message = f"ERROR: cluster offset for sector {sector} points after EOF"
                return CheckReport(
                    path, "vmdk", corruptions=1, failure=failure, messages=(message,)
                )
    finally:
        disk._close_extents()
    return CheckReport(path, "vmdk")
