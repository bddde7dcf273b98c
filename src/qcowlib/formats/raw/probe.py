"""raw: what a file is when no other format's probe claims it (QEMU's ``raw_probe``
answers for everything, with the lowest score).  An empty file is raw, as in QEMU."""

from __future__ import annotations

from qcowlib.core.probe import Match

__all__ = ["probe"]


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    return Match()
