"""Refcount table and block codecs for refcount_order 0..6 (qcow2.txt "Host cluster
management"), and the metadata-size arithmetic writers need.

Entries narrower than a byte are packed least-significant bits first, as QEMU's
``get_refcount_ro0``..``ro2`` read them; wider ones are big-endian.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from qcowlib.errors import CorruptImage
from qcowlib.formats.qcow2 import entries as _entries
from qcowlib.formats.qcow2.tables import U64

REFT_OFFSET_MASK: Final = _entries.REFT_OFFSET_MASK
_WIDE_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    3: np.dtype(">u1"),
    4: np.dtype(">u2"),
    5: np.dtype(">u4"),
    6: np.dtype(">u8"),
}


entries_per_block = _entries.entries_per_block


def decode_block(raw: bytes | bytearray | memoryview, refcount_order: int) -> U64:
    """A refcount block to one ``uint64`` refcount per cluster."""
    if refcount_order >= 3:
        return np.frombuffer(raw, dtype=_WIDE_DTYPES[refcount_order]).astype(np.uint64)
    width = 1 << refcount_order
    per_byte = 8 // width
    b = np.frombuffer(raw, dtype=np.uint8)
    shifts = (np.arange(per_byte, dtype=np.uint8) * width).astype(np.uint8)
    vals = (b[:, None] >> shifts) & np.uint8((1 << width) - 1)
    return vals.reshape(-1).astype(np.uint64)


def encode_block(refcounts: U64, refcount_order: int) -> bytes:
    """One ``uint64`` per cluster to a refcount block's bytes (values must fit)."""
    r = np.asarray(refcounts, dtype=np.uint64)
    width = 1 << refcount_order
    if width < 64 and np.any(r >> np.uint64(width)):
        raise CorruptImage(f"refcount does not fit in {width} bits")
    if refcount_order >= 3:
        return bytes(r.astype(_WIDE_DTYPES[refcount_order]).tobytes())
    per_byte = 8 // width
    if r.size % per_byte:
        r = np.concatenate([r, np.zeros(per_byte - r.size % per_byte, dtype=np.uint64)])
    shifts = np.arange(per_byte, dtype=np.uint64) * np.uint64(width)
    packed = np.bitwise_or.reduce(r.reshape(-1, per_byte) << shifts, axis=1)
    return bytes(packed.astype(np.uint8).tobytes())


def max_refcount(refcount_order: int) -> int:
    """The largest refcount an entry of this width holds."""
    return (1 << (1 << refcount_order)) - 1


def encode_span(
    block: npt.NDArray[Any], lo: int, hi: int, refcount_order: int
) -> tuple[int, bytes]:
    """The bytes of a refcount block that hold entries ``lo..hi-1``: ``(byte offset in
    the block, data)``.  Entries narrower than a byte round out to whole bytes, whose
    other entries are encoded from the same ``block``."""
    bits = 1 << refcount_order
    first_byte = lo * bits // 8
    end_byte = -(-(hi * bits) // 8)
    per_byte = max(1, 8 // bits)
    first_entry = first_byte * 8 // bits
    entries = block[first_entry : max(end_byte * 8 // bits, first_entry + per_byte)]
    return first_byte, encode_block(entries, refcount_order)[: end_byte - first_byte]
