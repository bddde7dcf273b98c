"""Is it a Bochs image?  ``block/bochs.c`` ``bochs_probe``: NUL-terminated magic ``Bochs
Virtual HD Image``, type ``Redolog``, subtype ``Growing`` and version 1 or 2
(:func:`qcowlib.formats.bochs.codec.is_bochs`).  Like QEMU, a file shorter than the
header is looked at as if padded with zeros."""

from __future__ import annotations

from qcowlib.core.probe import QEMU_PROBE_BUF_SIZE, Match
from qcowlib.formats.bochs.codec import is_bochs

__all__ = ["probe"]


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    return Match() if is_bochs(head.ljust(QEMU_PROBE_BUF_SIZE, b"\0")) else None
