"""``map``: the allocation map with qemu-img map's entries and merging."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from qcowlib.core.disk import Disk, Extent, ExtentKind


class MapEntry(NamedTuple):
    """One ``qemu-img map`` entry."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def _entry(ext: Extent) -> MapEntry:
    data = ext.kind in (ExtentKind.DATA, ExtentKind.COMPRESSED)
    zero = ext.kind in (ExtentKind.ZERO, ExtentKind.UNALLOCATED) or ext.hole
    offset = ext.host_offset if ext.kind is not ExtentKind.COMPRESSED else None
    return MapEntry(
        ext.start,
        ext.length,
        ext.depth,
        ext.present,
        zero,
        data,
        offset,
        ext.file if offset is not None else None,
    )


def _mergeable(a: MapEntry, b: MapEntry) -> bool:
    """qemu-img's ``entry_mergeable``."""
    if (a.zero, a.data, a.depth, a.present) != (b.zero, b.data, b.depth, b.present):
        return False
    if a.filename != b.filename or (a.offset is None) != (b.offset is None):
        return False
    return a.offset is None or b.offset == a.offset + a.length


def map_entries(disk: Disk) -> Iterator[MapEntry]:
    """The entries ``qemu-img map`` prints for ``disk`` (resolved through its chain)."""
    current: MapEntry | None = None
    encrypted = [d.encrypted for d in disk.chain]
    for ext in disk.extents():
        entry = _entry(ext)
        if encrypted[ext.depth] and entry.offset is not None:
            entry = entry._replace(offset=None, filename=None)  # ciphertext: no offset
        if current is not None and _mergeable(current, entry):
            current = MapEntry(
                current.start,
                current.length + entry.length,
                current.depth,
                current.present,
                current.zero,
                current.data,
                current.offset,
                current.filename,
            )
            continue
        if current is not None:
            yield current
        current = entry
    if current is None:
        # An empty disk: qemu-img prints its zero-initialised entry.
        current = MapEntry(0, 0, 0, False, False, False, None, None)
    yield current
