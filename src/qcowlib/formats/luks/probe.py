"""Is it LUKS?  ``crypto/block-luks.c`` ``qcrypto_block_luks_has_format``: magic
``LUKS\\xba\\xbe`` and big-endian version 1 at offset 6.

QEMU only knows LUKS1; qcowlib also reports version 2 (cryptsetup's LUKS2) as LUKS so
that it is refused as unsupported rather than read as a raw disk.
"""

from __future__ import annotations

from typing import Final

from qcowlib.core.probe import Match

__all__ = ["LUKS_MAGIC", "probe"]

#: The magic at offset 0 (the codec takes it from here: probing loads no codec).
LUKS_MAGIC: Final = b"LUKS\xba\xbe"
_VERSIONS: Final = (1, 2)


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    if len(head) < 8 or head[:6] != LUKS_MAGIC:
        return None
    return Match() if int.from_bytes(head[6:8], "big") in _VERSIONS else None
