"""Is it an ISO 9660 image?  Not a QEMU format (QEMU reads ISO images as raw): an ISO 9660
volume descriptor at 0x8000, i.e. standard identifier ``CD001`` at 0x8001 and
descriptor version 1 at 0x8006 (ECMA-119)."""

from __future__ import annotations

from typing import Final

from qcowlib.core.probe import Match

__all__ = ["probe"]

_DESCRIPTOR_AT: Final = 0x8000
_IDENTIFIER: Final = b"CD001"
_VERSION: Final = 1


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    at = _DESCRIPTOR_AT
    if len(head) < at + 7:
        return None
    if head[at + 1 : at + 6] != _IDENTIFIER or head[at + 6] != _VERSION:
        return None
    return Match()
