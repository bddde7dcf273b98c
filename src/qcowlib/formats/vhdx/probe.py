"""Is it VHDX?  ``block/vhdx.c`` ``vhdx_probe``: file type identifier ``vhdxfile`` at 0
(MS-VHDX)."""

from __future__ import annotations

from typing import Final

from qcowlib.core.probe import Match

__all__ = ["probe"]

_SIGNATURE: Final = b"vhdxfile"


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    return Match() if head[:8] == _SIGNATURE else None
