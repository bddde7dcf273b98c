"""Is it VDI?  ``block/vdi.c`` ``vdi_probe``: signature ``0xbeda107f`` little-endian at
offset 0x40."""

from __future__ import annotations

import struct
from typing import Final

from qcowlib.core.probe import Match

__all__ = ["probe"]

_SIGNATURE_AT: Final = 0x40
_SIGNATURE: Final = struct.pack("<I", 0xBEDA107F)


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    return Match() if head[_SIGNATURE_AT : _SIGNATURE_AT + 4] == _SIGNATURE else None
