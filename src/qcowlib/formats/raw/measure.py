"""``measure -O raw``: QEMU's ``raw_measure`` (block/raw-format.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from qcowlib._units import align_up
from qcowlib.core.measure import FILE_OPTIONS, OptionValues, SizeMeasure

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk

__all__ = ["MEASURE"]

_SECTOR: Final = 512


def _measure(opts: OptionValues, disk: Disk | None) -> dict[str, int]:
    """Every byte of the virtual disk is in the file."""
    if disk is not None:
        required = disk.virtual_size
    else:
        required = align_up(int(opts.get("size", 0)), _SECTOR)
    return {"required": required, "fully-allocated": required}


MEASURE: Final = SizeMeasure(dict(FILE_OPTIONS), _measure)
