"""Is it a cloop image?  ``block/cloop.c`` ``cloop_probe``: the file starts with the V2.0
shell script header (:data:`qcowlib.formats.cloop.codec.CLOOP_MAGIC`), all of it (QEMU
compares its zero-padded 2 KiB buffer)."""

from __future__ import annotations

from qcowlib.core.probe import Match
from qcowlib.formats.cloop.codec import is_cloop

__all__ = ["probe"]


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    return Match() if is_cloop(head) else None
