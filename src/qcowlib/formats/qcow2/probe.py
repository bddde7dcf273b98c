"""Is it qcow2?  ``block/qcow2.c`` ``qcow2_probe``: magic ``QFI\\xfb`` and a big-endian
version 2 or 3.

Versions above 3 are qcow2 with detail ``"unsupported-version"`` (QEMU claims none of
them): the qcow2 parser then refuses them with a clear "unsupported version" error,
instead of the file being silently treated as a raw disk that starts with an image
header.  Magic with version 0 is claimed by no QEMU driver; version 1 is legacy qcow
(:mod:`qcowlib.formats.qcow.probe`).
"""

from __future__ import annotations

from typing import Final

from qcowlib.core.probe import Match

__all__ = ["probe"]

_MAGIC: Final = b"QFI\xfb"
_VERSIONS: Final = (2, 3)


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    if len(head) < 8 or head[:4] != _MAGIC:
        return None
    version = int.from_bytes(head[4:8], "big")
    if version in _VERSIONS:
        return Match()
    if version > max(_VERSIONS):
        return Match("unsupported-version")
    return None
