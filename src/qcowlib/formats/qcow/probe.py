"""Is it legacy qcow?  ``block/qcow.c`` ``qcow_probe``: magic ``QFI\\xfb`` and a
big-endian version 1 (qcow2's magic with its own version)."""

from __future__ import annotations

from typing import Final

from qcowlib.core.probe import Match

__all__ = ["probe"]

_MAGIC: Final = b"QFI\xfb"


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    if len(head) < 8 or head[:4] != _MAGIC:
        return None
    return Match() if int.from_bytes(head[4:8], "big") == 1 else None
