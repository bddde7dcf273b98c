"""The key order of QEMU's JSON objects.

``qemu-img`` prints QAPI objects through a ``QDict``: a hash table of 512 buckets whose
iteration goes bucket by bucket, newest entry first within a bucket.  The order of keys
in its JSON (and in its human "Format specific information") is therefore fixed by
each key's hash, not by the QAPI schema.  :func:`qdict_order` reproduces it, so output
built from a plain ``dict`` prints exactly as qemu-img's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

_BUCKETS: Final = 512


def _tdb_hash(name: str) -> int:
    """QEMU's ``tdb_hash`` (``qobject/qdict.c``), in 32-bit arithmetic."""
    data = name.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with its keys in the order qemu-img would print them."""
    keys = list(values)
    ranked = sorted(enumerate(keys), key=lambda p: (_tdb_hash(p[1]) % _BUCKETS, -p[0]))
    return {k: values[k] for _, k in ranked}
