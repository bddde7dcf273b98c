"""Is it QED?  ``block/qed.c`` ``bdrv_qed_probe``: magic ``QED\\0`` (little-endian
``QED_MAGIC``, docs/interop/qed_spec.txt).

QEMU's probe wants a whole header in its buffer, but QEMU 7.2 always hands it
BLOCK_PROBE_BUF_SIZE bytes, zero-filled past the end of a short file: a file shorter
than the header is still QED (and then refused when opened), as here.
"""

from __future__ import annotations

from typing import Final

from qcowlib.core.probe import Match

__all__ = ["probe"]

_MAGIC: Final = b"QED\0"


def probe(head: bytes, tail: bytes, file_size: int) -> Match | None:
    return Match() if head[:4] == _MAGIC else None
