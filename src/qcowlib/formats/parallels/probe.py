"""Is it Parallels?  ``block/parallels.c`` ``parallels_probe``: magic
``WithoutFreeSpace`` or ``WithouFreSpacExt`` and little-endian version 2
(docs/interop/parallels.txt).

Like QEMU (whose probe buffer is zero-filled past the end of a short file), a file
shorter than the header is still Parallels when its magic and version are there.
"""

from __future__ import annotations

import struct
from typing import Final

from qcowlib.core.probe import Match

__all__ = ["probe"]

_MAGICS: Final = (b"WithoutFreeSpace", b"WithouFreSpacExt")
_VERSION: Final = struct.pack("<I", 2)


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    if head[:16] not in _MAGICS:
        return None
    # Zero-filled past a short file, as QEMU's probe buffer is.
    version = head[16:20].ljust(4, b"\0")
    return Match() if version == _VERSION else None
