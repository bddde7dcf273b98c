"""Is it a DMG?  QEMU's ``dmg_probe`` looks only at the file name (``*.dmg``).  qcowlib
never probes by name: the last 512 bytes must be a UDIF trailer (magic ``koly``, version
4, header size 512; :func:`qcowlib.formats.dmg.codec.is_dmg_trailer`).  So a DMG named
otherwise is a DMG here and raw to ``qemu-img``, and a file named ``*.dmg`` without a
trailer is raw here (``qemu-img`` fails to open it as dmg).

It is asked after the headers image tools write at offset 0: a DMG's data starts there
and may itself begin with anything.
"""

from __future__ import annotations

from qcowlib.core.probe import Match
from qcowlib.formats.dmg.codec import is_dmg_trailer

__all__ = ["probe"]


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    return Match() if is_dmg_trailer(tail) else None
